"""The tiny world's text side: a word-level tokenizer over the world's vocabulary and a small
transformer that gives token states (cross-attention input) and a pooled vector (SD3's pooled input,
CLIP's text embedding). The empty prompt is the unconditional input: only the [BOS] token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PAD, BOS = "[PAD]", "[BOS]"


class UnknownWordError(ValueError):
    """A prompt uses a word outside the tiny world's vocabulary."""


class WordTokenizer:
    """Lower-cased whitespace words -> ids, [BOS] first, [PAD] to a fixed length."""

    def __init__(self, vocabulary: Sequence[str], max_length: int = 16) -> None:
        self.words = [PAD, BOS, *sorted(set(vocabulary))]
        self.ids = {word: i for i, word in enumerate(self.words)}
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.words)

    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(ids (B, L) long, mask (B, L) bool) for a batch of prompts."""
        ids = torch.full((len(prompts), self.max_length), self.ids[PAD], dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt.lower().split()
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise UnknownWordError(
                    f"prompt {prompt!r} uses {unknown}, outside the tiny world's vocabulary: "
                    f"{' '.join(self.words[2:])}"
                )
            if len(words) + 1 > self.max_length:
                raise ValueError(
                    f"prompt {prompt!r} has {len(words)} words; the encoder takes {self.max_length - 1}"
                )
            ids[row, : len(words) + 1] = torch.tensor([self.ids[BOS], *(self.ids[w] for w in words)])
        return ids, ids != self.ids[PAD]


@dataclass(frozen=True)
class TextEncoderConfig:
    width: int = 64
    layers: int = 2
    heads: int = 4
    max_length: int = 16


@dataclass
class Cond:
    """Encoded prompts: token states (B, L, D), their mask (B, L) and the pooled vector (B, D)."""

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __getitem__(self, index) -> Cond:
        return Cond(self.tokens[index], self.mask[index], self.pooled[index])

    @staticmethod
    def cat(parts: Sequence[Cond]) -> Cond:
        return Cond(
            torch.cat([p.tokens for p in parts]),
            torch.cat([p.mask for p in parts]),
            torch.cat([p.pooled for p in parts]),
        )


class TinyTextEncoder(nn.Module):
    """Word embeddings + learned positions + a pre-norm transformer; pooled = masked mean."""

    def __init__(self, vocabulary: Sequence[str], config: TextEncoderConfig = TextEncoderConfig()) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = WordTokenizer(vocabulary, config.max_length)
        self.embed = nn.Embedding(len(self.tokenizer), config.width)
        self.position = nn.Parameter(torch.zeros(config.max_length, config.width))
        layer = nn.TransformerEncoderLayer(
            config.width, config.heads, 4 * config.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)

    def forward(self, prompts: Sequence[str]) -> Cond:
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(self.position.device), mask.to(self.position.device)
        hidden = self.embed(ids) + self.position
        hidden = self.norm(self.transformer(hidden, src_key_padding_mask=~mask))
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        return Cond(hidden * weights, mask, pooled)
