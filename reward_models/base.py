"""Checks shared by the reward models (the Reward protocol itself is rsm_core.interfaces.Reward)."""

from __future__ import annotations

from torch import Tensor


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
