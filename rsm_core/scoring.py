"""Latents to rewards a chunk at a time.

A 512 px SD3.5 VAE decode of a collection call's 216 children at once needs tens of GiB of
activations; the published code decodes (and scores) 12 at a time. Every arm scores through here,
so the chunk is one config value (``decode_chunk``) and results do not depend on it beyond rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from rsm_core.interfaces import Backbone, Reward


def decode_and_score(
    backbone: Backbone,
    rewards: Mapping[str, Reward],
    latents: Tensor,
    prompts: Sequence[str],
    metas: Sequence[dict],
    chunk: int,
) -> dict[str, Tensor]:
    """Each reward's float32 scores (on the CPU) of the decoded ``latents``, ``chunk`` images at a time."""
    scores: dict[str, list[Tensor]] = {name: [] for name in rewards}
    for start in range(0, len(latents), chunk):
        end = start + chunk
        images = backbone.decode(latents[start:end])
        for name, reward in rewards.items():
            value = reward(images, list(prompts[start:end]), list(metas[start:end]))
            scores[name].append(value.detach().float().cpu())
    return {name: torch.cat(values) if values else torch.zeros(0) for name, values in scores.items()}
