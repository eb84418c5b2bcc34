"""pickscore: PickScore, a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences.

As in Flow-GRPO's ``pickscore_scorer.py`` (spec zo_flow_tempflow, section 11): the ``CLIPModel`` of
``yuvalkirstain/PickScore_v1`` with the ``CLIPProcessor`` of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
(its tokenizer, padding to the longest prompt, truncation at 77 tokens; its image settings: bicubic resize
of the shortest side to 224, centre crop 224, CLIP mean/std). PickScore itself is the learned logit scale
times the cosine of the L2-normalised image and text embeddings (``raw``, roughly 20-24 for typical
images); Flow-GRPO divides it by 26 to bring it near 1, and so does this reward's output. fp32, frozen.

The image preprocessing runs in torch (``clip_preprocess``) so that gradients reach the images; the
processor's image settings are checked on load to be the ones it replicates. Nothing is ever downloaded:
the model and the processor must be local directories or hub ids already in the local Hugging Face cache.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from reward_models.base import load_local, unit_features
from reward_models.laion_aesthetic import CLIP_MEAN, CLIP_STD, clip_preprocess
from rsm_core.records import AssetError

MODEL_REPO = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
FLOW_GRPO_DIVISOR = 26.0  # Flow-GRPO's pickscore_scorer.py: "scores = scores/26"
MAX_TOKENS = 77
HOW_TO_GET = (
    f"`hf download {MODEL_REPO}` and `hf download {PROCESSOR_REPO} --include '*.json' '*.txt'` put them in "
    f"the Hugging Face cache (or download each with --local-dir DIR and pass DIR as model_path / "
    f"processor_path)"
)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as the processor config stores it


def _load(kind: str, source: str | Path, loader: type):
    return load_local("pickscore", kind, source, loader, HOW_TO_GET)


def load_model(source: str | Path):
    from transformers import CLIPModel

    return _load("PickScore model", source, CLIPModel)


def load_processor(source: str | Path):
    from transformers import CLIPProcessor

    return _load("CLIP processor", source, CLIPProcessor)


def processor_image_size(processor, source: str | Path) -> int:
    """The crop size, after checking that the processor's image settings are the ones ``clip_preprocess``
    replicates (resize the shortest side to the crop size, bicubic, centre crop, rescale, CLIP mean/std)."""
    settings = processor.image_processor.to_dict()
    size = settings.get("crop_size", {}).get("height")
    expected = {
        "do_resize": True,
        "resample": BICUBIC,
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "do_normalize": True,
    }
    differ = [key for key, value in expected.items() if settings.get(key) != value]
    if not math.isclose(settings.get("rescale_factor", 0.0), 1 / 255):
        differ.append("rescale_factor")
    for key, value in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        if not torch.allclose(torch.tensor(settings.get(key, (0.0,) * 3)), torch.tensor(value)):
            differ.append(key)
    if differ:
        raise AssetError(
            f"pickscore reward: the processor at {str(source)!r} is not {PROCESSOR_REPO}'s: its image "
            f"settings {sorted(differ)} differ from the ones the differentiable preprocessing replicates; "
            f"{HOW_TO_GET}"
        )
    return int(size)


class PickScore(nn.Module):
    """Images in [0, 1], (B, 3, H, W) and their prompts -> PickScore / 26 (B,), fp32, differentiable in
    the images."""

    name = "pickscore"
    differentiable = True

    def __init__(
        self,
        model_path: str | Path = MODEL_REPO,
        processor_path: str | Path = PROCESSOR_REPO,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.clip = load_model(model_path)
        self.processor = load_processor(processor_path)
        self.image_size = processor_image_size(self.processor, processor_path)
        self.to(device=device, dtype=dtype)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PickScore:
        """Always eval: a reward is never trained here."""
        return super().train(False)

    def embed_images(self, images: Tensor) -> Tensor:
        """L2-normalised projected image embeddings (B, projection_dim), differentiable in the images."""
        parameter = next(self.clip.parameters())
        pixels = clip_preprocess(images.to(device=parameter.device, dtype=parameter.dtype), self.image_size)
        return unit_features(self.clip.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> Tensor:
        """L2-normalised projected text embeddings (B, projection_dim), tokenised as Flow-GRPO does."""
        tokens = self.processor.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        device = next(self.clip.parameters()).device
        return unit_features(self.clip.get_text_features(**{k: v.to(device) for k, v in tokens.items()}))

    def raw(self, images: Tensor, prompts: list[str]) -> Tensor:
        """PickScore as its authors define it: exp(logit_scale) x cosine(image, prompt), (B,)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        cosine = (self.embed_images(images) * self.embed_prompts(prompts)).sum(-1)
        return self.clip.logit_scale.exp() * cosine

    def forward(self, images: Tensor, prompts: list[str], meta: list[dict] | None = None) -> Tensor:
        return (self.raw(images, prompts) / FLOW_GRPO_DIVISOR).float()
