"""Batches of (rendered scene, prompt) pairs for training the tiny world's models."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from rsm_core.world.scenes import render_batch, sample_scene


class SceneSampler:
    """Draw prompts uniformly from ``metadata`` and render a random scene that satisfies each."""

    def __init__(self, metadata: Sequence[dict], resolution: int = 32) -> None:
        if not metadata:
            raise ValueError("SceneSampler needs at least one metadata entry")
        self.metadata = list(metadata)
        self.resolution = resolution

    def __call__(self, generator: torch.Generator, n: int) -> tuple[Tensor, list[str], list[dict]]:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        picks = [self.metadata[i] for i in rng.integers(len(self.metadata), size=n)]
        images = render_batch([sample_scene(meta, rng) for meta in picks], size=self.resolution)
        return images, [m["prompt"] for m in picks], picks
