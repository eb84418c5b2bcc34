"""shapes_clip: a tiny CLIP-style image-text model trained contrastively on the world, and
shapes_hps, which adds the aesthetic score to it (the tiny world's HPSv2.1 analogue).

Its text tower is also the frozen text encoder of both tiny backbones, as SD1.5 conditions on CLIP's
text encoder. Scores are 2.5 x cosine similarity (the CLIPScore scale), differentiable in the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reward_models.shapes_aesthetic import ShapesAesthetic
from rsm_core.backbones.text import TextEncoderConfig, TinyTextEncoder
from rsm_core.optim import fit

PairSampler = Callable[[torch.Generator, int], tuple[Tensor, list[str]]]  # -> (images in [0,1], prompts)


class ImageEncoder(nn.Module):
    def __init__(self, width: int = 32, embed: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2),
            nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1, stride=2),
            nn.SiLU(),
        )
        self.head = nn.Linear(4 * width * 16, embed)  # keeps the 4 x 4 layout: positions matter

    def forward(self, images: Tensor) -> Tensor:
        h = F.adaptive_avg_pool2d(self.features(images * 2 - 1), 4)
        return self.head(h.flatten(1))


class TinyCLIP(nn.Module):
    def __init__(self, vocabulary: Sequence[str], text: TextEncoderConfig | None = None, embed: int = 64):
        super().__init__()
        text = text or TextEncoderConfig()
        self.image = ImageEncoder(embed=embed)
        self.text = TinyTextEncoder(vocabulary, text)
        self.text_projection = nn.Linear(text.width, embed, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_images(self, images: Tensor) -> Tensor:
        return F.normalize(self.image(images), dim=-1)

    def embed_texts(self, prompts: Sequence[str]) -> Tensor:
        return F.normalize(self.text_projection(self.text(prompts).pooled), dim=-1)


def contrastive_loss(model: TinyCLIP, images: Tensor, prompts: list[str]) -> Tensor:
    """Symmetric InfoNCE where every image of the same prompt counts as a positive."""
    logits = (
        model.logit_scale.exp().clamp(max=100) * model.embed_images(images) @ model.embed_texts(prompts).T
    )
    same = torch.tensor([[a == b for b in prompts] for a in prompts], dtype=logits.dtype)
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_clip(
    vocabulary: Sequence[str],
    pairs: PairSampler,
    steps: int = 2000,
    batch: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[TinyCLIP, float]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyCLIP(vocabulary)

    def step_loss(step: int) -> Tensor:
        images, prompts = pairs(generator, batch)
        return contrastive_loss(model, images, prompts)

    loss = fit(model.parameters(), step_loss, steps, lr, progress=progress)
    return model.eval(), loss


class ShapesCLIP:
    name = "shapes_clip"
    differentiable = True
    scale = 2.5

    def __init__(self, model: TinyCLIP) -> None:
        self.model = model.requires_grad_(False).eval()

    def __call__(self, images: Tensor, prompts: list[str], meta: list[dict] | None = None) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"shapes_clip got {images.shape[0]} images but {len(prompts)} prompts")
        return self.scale * (self.model.embed_images(images) * self.model.embed_texts(prompts)).sum(-1)


class ShapesHPS:
    """shapes_clip + aesthetic_weight x shapes_aesthetic / 10: text alignment first, quality second."""

    name = "shapes_hps"
    differentiable = True

    def __init__(self, clip: ShapesCLIP, aesthetic: ShapesAesthetic, aesthetic_weight: float = 0.5) -> None:
        self.clip, self.aesthetic, self.aesthetic_weight = clip, aesthetic, aesthetic_weight

    def __call__(self, images: Tensor, prompts: list[str], meta: list[dict] | None = None) -> Tensor:
        return self.clip(images, prompts) + self.aesthetic_weight * self.aesthetic(images) / 10
