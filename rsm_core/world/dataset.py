"""Batches of (rendered scene, prompt) pairs for training the tiny world's models."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from rsm_core.world.scenes import render_batch, sample_scene


class SceneSampler:
    """Draw prompts from ``metadata`` and render a random scene that satisfies each.

    With ``balance_tags`` a draw first picks a GenEval tag uniformly, then a prompt of that tag, so the
    three single-object prompts are seen as often as the ninety colour-attribution ones; otherwise
    prompts are drawn uniformly.
    """

    def __init__(self, metadata: Sequence[dict], resolution: int = 32, balance_tags: bool = False) -> None:
        if not metadata:
            raise ValueError("SceneSampler needs at least one metadata entry")
        self.metadata = list(metadata)
        self.resolution = resolution
        by_tag: dict[str, list[int]] = defaultdict(list)
        for i, meta in enumerate(self.metadata):
            by_tag[meta["tag"]].append(i)
        weights = np.array(
            [
                1 / (len(by_tag) * len(by_tag[m["tag"]])) if balance_tags else 1 / len(self.metadata)
                for m in self.metadata
            ]
        )
        self.weights = weights / weights.sum()

    def __call__(self, generator: torch.Generator, n: int) -> tuple[Tensor, list[str], list[dict]]:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        picks = [self.metadata[i] for i in rng.choice(len(self.metadata), size=n, p=self.weights)]
        images = render_batch([sample_scene(meta, rng) for meta in picks], size=self.resolution)
        return images, [m["prompt"] for m in picks], picks
