"""aesthetic: the LAION "improved aesthetic predictor", the paper-scale Aesthetic Score reward.

As in Flow-GRPO's ``aesthetic_scorer.py`` (spec section 11): CLIP ViT-L/14 image embedding
(``get_image_features``, the 768-d projected embedding), L2-normalised, then a five-layer MLP head with
dropout between the first layers and no activation functions, so the score is an affine function of the
normalised embedding. The head weights are ``sac+logos+ava1-l14-linearMSE.pth``. The output is the raw
score (roughly 1-10), fp32, with no normalisation.

The preprocessing is written in torch so that gradients reach the images; see ``clip_preprocess`` for how
it differs from the reference's PIL processor. Nothing is ever downloaded: CLIP must be a local directory
or a hub id already in the local Hugging Face cache, and the head a local file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsm_core.backbones.stable_diffusion import _download_hint
from rsm_core.records import DATA_ENV, AssetError, data_root

CLIP_REPO = "openai/clip-vit-large-patch14"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_ENV = "RSM_AESTHETIC_HEAD"
HEAD_SOURCE = (
    f"the file {HEAD_FILE} of the LAION improved-aesthetic-predictor repository "
    f"(https://github.com/christophschuhmann/improved-aesthetic-predictor)"
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def default_head_path() -> Path:
    """``$RSM_AESTHETIC_HEAD`` if set, otherwise the head in the data root, where `make paper-data` puts it
    (``$RSM_BENCH_DATA``, default ``~/.cache/rsm_bench/sac+logos+ava1-l14-linearMSE.pth``)."""
    return Path(os.environ.get(HEAD_ENV) or data_root() / HEAD_FILE).expanduser()


def clip_preprocess(images: Tensor, size: int) -> Tensor:
    """Images in [0, 1], (B, 3, H, W) -> CLIP pixel values (B, 3, size, size), differentiably.

    Same steps as ``CLIPImageProcessor`` of ``openai/clip-vit-large-patch14`` (with ``size`` = 224): resize
    the shortest side to ``size`` (the long side to ``int(size * long / short)``) with bicubic
    interpolation, centre crop ``size`` x ``size`` (offsets rounded down), normalise with the CLIP mean and
    std. It differs slightly from the PIL processor of the official code: the images are not quantised to
    uint8 first, and torch's antialiased bicubic filter is not bit-identical to PIL's (the result is
    clamped to [0, 1] as PIL's uint8 output is, so overshoot at edges is cut the same way).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if height <= width else (new_long, size)
    if new_size != (height, width):
        images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True)
        images = images.clamp(0.0, 1.0)
    top = (new_size[0] - size) // 2
    left = (new_size[1] - size) // 2
    images = images[..., top : top + size, left : left + size]
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


class AestheticHead(nn.Module):
    """The LAION MLP: no activations; dropout is inactive in eval mode. Parameter names match the
    released state dict (``layers.0.weight``, ..., ``layers.7.bias``)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: Tensor) -> Tensor:
        return self.layers(embedding)


def load_clip(clip_path: str | Path):
    """``CLIPModel`` from a local directory or the local HF cache; never touches the network."""
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(str(clip_path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise AssetError(
            f"aesthetic reward: no CLIP model at {str(clip_path)!r} (looked for a local directory, then for "
            f"that hub id in the local Hugging Face cache; {type(error).__name__}: {error}); "
            f"{_download_hint(CLIP_REPO)}"
        ) from None


def load_head(head_path: str | Path, input_size: int) -> AestheticHead:
    """The MLP head from a torch state dict, loaded with ``weights_only=True`` and strict key matching."""
    path = Path(head_path).expanduser()
    how_to_get = (
        f"run `make paper-data` to fetch {HEAD_SOURCE} into {data_root()} (${DATA_ENV}), "
        f"or point ${HEAD_ENV} (or head_path) at it"
    )
    if not path.is_file():
        raise AssetError(
            f"aesthetic reward: missing head weights {HEAD_FILE}: no file at {path}; {how_to_get}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused or a corrupt file; report it as an asset problem
        raise AssetError(
            f"aesthetic reward: could not read head weights {path} ({type(error).__name__}: {error}); "
            f"{how_to_get}"
        ) from error
    head = AestheticHead(input_size)
    if not isinstance(state, dict):
        raise AssetError(
            f"aesthetic reward: {path} holds a {type(state).__name__}, not a state dict; {how_to_get}"
        )
    expected, found = set(head.state_dict()), set(state)
    if expected != found:
        raise AssetError(
            f"aesthetic reward: {path} is not the LAION aesthetic head: missing keys "
            f"{sorted(expected - found)}, unexpected keys {sorted(found - expected)}; {how_to_get}"
        )
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as error:  # right keys, wrong shapes (e.g. a head for another CLIP width)
        raise AssetError(
            f"aesthetic reward: {path} does not fit a CLIP embedding of size {input_size}: {error}"
        ) from error
    return head


class LAIONAesthetic(nn.Module):
    """Images in [0, 1], (B, 3, H, W) -> LAION aesthetic score (B,), fp32; prompts are ignored."""

    name = "aesthetic"
    differentiable = True

    def __init__(
        self,
        clip_path: str = CLIP_REPO,
        head_path: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.clip = load_clip(clip_path)
        # the head's input is the projected embedding: 768 for ViT-L/14, smaller for test models
        self.head = load_head(head_path or default_head_path(), self.clip.config.projection_dim)
        self.image_size = int(self.clip.config.vision_config.image_size)
        self.to(device=device, dtype=dtype)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LAIONAesthetic:
        """Always eval: dropout in the head must stay off (a reward is never trained here)."""
        return super().train(False)

    def embed(self, images: Tensor) -> Tensor:
        """The L2-normalised projected CLIP image embedding (B, projection_dim)."""
        parameter = next(self.clip.parameters())
        pixels = clip_preprocess(images.to(device=parameter.device, dtype=parameter.dtype), self.image_size)
        output = self.clip.get_image_features(pixel_values=pixels)
        # transformers < 5 returns the tensor, >= 5 a BaseModelOutputWithPooling holding it as pooler_output
        features = output if isinstance(output, Tensor) else output.pooler_output
        return features / torch.linalg.vector_norm(features, dim=-1, keepdim=True)

    def forward(
        self, images: Tensor, prompts: list[str] | None = None, meta: list[dict] | None = None
    ) -> Tensor:
        return self.head(self.embed(images)).squeeze(-1).float()
