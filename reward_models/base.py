"""What every reward model offers the trainer (DESIGN.md "Interfaces")."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Reward(Protocol):
    name: str
    differentiable: bool  # True: first-order methods may backpropagate through __call__

    def __call__(self, images: Tensor, prompts: list[str], meta: list[dict] | None = None) -> Tensor:
        """Images in [0, 1], (B, 3, H, W) -> rewards (B,)."""
        ...


def check_geneval_batch(images: Tensor, prompts: list[str], meta: list[dict] | None) -> list[dict]:
    """The metadata of a GenEval-scored batch, after checking it matches the images and prompts."""
    if meta is None:
        raise ValueError(
            "GenEval needs the prompt metadata (tag, include, exclude) for every prompt; got meta=None"
        )
    if not len(meta) == len(prompts) == images.shape[0]:
        raise ValueError(
            f"length mismatch: {images.shape[0]} images, {len(prompts)} prompts, {len(meta)} metadata"
        )
    for prompt, entry in zip(prompts, meta, strict=True):
        if "prompt" in entry and entry["prompt"] != prompt:
            raise ValueError(f"metadata is for {entry['prompt']!r} but the prompt is {prompt!r}")
    return meta
