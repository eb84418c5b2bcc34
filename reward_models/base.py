"""Checks and loaders shared by the reward models (the Reward protocol itself is
rsm_core.interfaces.Reward)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rsm_core.records import AssetError


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


def load_local(reward: str, kind: str, source: str | Path, loader: type, how_to_get: str):
    """``loader.from_pretrained`` with local files only; a failure is a one-line asset error naming
    ``how_to_get`` (the downloads)."""
    try:
        return loader.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as error:
        detail = " ".join(str(error).split())  # transformers' messages span several lines
        raise AssetError(
            f"{reward} reward: no {kind} at {str(source)!r} (looked for a local directory, then for that "
            f"hub id in the local Hugging Face cache; {type(error).__name__}: {detail}); {how_to_get}"
        ) from None


def unit_features(output) -> Tensor:
    """L2-normalised CLIP features from ``get_image_features`` / ``get_text_features``: transformers < 5
    returns the tensor, >= 5 a BaseModelOutputWithPooling holding it as pooler_output."""
    features = output if isinstance(output, Tensor) else output.pooler_output
    return features / torch.linalg.vector_norm(features, dim=-1, keepdim=True)
