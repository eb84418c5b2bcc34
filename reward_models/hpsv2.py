"""hpsv2: HPSv2.1 (Human Preference Score v2.1), the reward of every first-order run.

The first-order code (spec fo_first_order, section 0.3) builds open_clip's ViT-H-14 (the HPSv2 fork),
loads the HPS v2.1 state dict ``HPS_v2.1_compressed.pt`` of the Hub repo ``xswu/HPSv2`` over it, and
scores an image in [0, 1] against its prompt as the cosine of the L2-normalised image and text
embeddings (no logit scale; typical values 0.2-0.35). Frozen, eval, fp32.

open_clip needs torchvision, which cannot be installed beside the CPU torch build, so the same network
runs here as transformers' ``CLIPModel``: ``convert_open_clip`` renames open_clip's state dict to
CLIPModel's names (q, k, v split out of the packed in-projection, the two projections transposed) and
the load is strict. What makes the two the same network (facts read in mlfoundations/open_clip
``src/open_clip/transformer.py`` and ``model.py``): pre-norm residual blocks with exact GELU, a patch
embedding without bias, a class token with learned positions, ln_pre before and ln_post after the
vision transformer, the class token's output times ``visual.proj``; the text tower has a causal mask
and pools at the end-of-text token (open_clip takes the argmax token id, which is the first
end-of-text token since it has the largest id; CLIPTextModel takes the first end-of-text token), then
``ln_final`` and ``text_projection``. Because of the causal mask the pooled token never sees the
padding, so open_clip's zero padding and the CLIP tokenizer's end-of-text padding give the same
embedding.

The image preprocessing is open_clip's ``ResizeMaxSize(224, fill=0)`` in torch, so that gradients
reach the images (``resize_max_size``). Nothing is ever downloaded: the checkpoint must be in the data
root or the local Hugging Face cache, and the tokenizer (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s,
the same BPE as OpenAI CLIP's) a local directory or cached.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reward_models.base import load_local, unit_features
from reward_models.laion_aesthetic import CLIP_MEAN, CLIP_STD
from rsm_core.records import DATA_ENV, AssetError, data_root

HPS_REPO = "xswu/HPSv2"
HPS_FILE = "HPS_v2.1_compressed.pt"
TOKENIZER_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MAX_TOKENS = 77  # open_clip's context length


def how_to_get_checkpoint() -> str:
    return (
        f"`hf download {HPS_REPO} {HPS_FILE}` puts it in the Hugging Face cache (or put the file in the "
        f"data root {data_root()} (${DATA_ENV}), or pass its path as checkpoint_path)"
    )


HOW_TO_GET_TOKENIZER = (
    f"`hf download {TOKENIZER_REPO} --include '*.json' '*.txt'` puts it in the Hugging Face cache (or "
    f"add --local-dir DIR and pass DIR as tokenizer_path)"
)

# open_clip's ViT-H-14 (model_configs/ViT-H-14.json: embed 1024; vision width 1280, 32 layers, head
# width 80, patch 14, image 224; text width 1024, 16 heads, 24 layers, context 77, vocab 49408; MLP
# ratio 4, nn.GELU, LayerNorm eps 1e-5) in CLIPModel's terms, as laion's CLIPModel conversion states it.
VIT_H_14 = {
    "projection_dim": 1024,
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "patch_size": 14,
        "image_size": 224,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    },
    "text_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "max_position_embeddings": MAX_TOKENS,
        "vocab_size": 49408,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    },
}


def vit_h_14_config():
    from transformers import CLIPConfig

    return CLIPConfig(**VIT_H_14)


# ------------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------------


def resize_max_size(images: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """open_clip's ``ResizeMaxSize(size, fill)`` on (B, C, H, W) float images, differentiably: bicubic
    resize so that the longer side is ``size`` (the shorter to ``round(side * size / longer)``, Python's
    rounding as there), then pad with ``fill`` to ``size`` x ``size``, the odd pixel of the padding on
    the right / bottom (torchvision's pad of [w // 2, h // 2, w - w // 2, h - h // 2]).

    The resize is torch's antialiased bicubic, which is what torchvision's tensor resize runs (its
    default since torchvision 0.17); it is not clamped afterwards, as torchvision does not clamp float
    images. open_clip skips resize and pad when the longer side is already ``size``, which would leave a
    non-square image unpadded; here such an image is padded."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if new_size != (height, width):
        images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = size - new_size[0], size - new_size[1]
    if pad_h or pad_w:
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)  # left, right, top, bottom
        images = F.pad(images, padding, value=fill)
    return images


def hps_preprocess(images: Tensor, size: int) -> Tensor:
    """Images in [0, 1], (B, 3, H, W) -> HPS pixel values (B, 3, size, size): clamp to [0, 1],
    ``resize_max_size`` with black padding, CLIP mean/std."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    images = resize_max_size(images.clamp(0.0, 1.0), size, fill=0.0)
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


# ------------------------------------------------------------------------------------------------
# open_clip state dict -> CLIPModel
# ------------------------------------------------------------------------------------------------

# whole-tensor renames (open_clip name -> CLIPModel name); the projections are transposed
_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
# Saved by open_clip versions that kept the text tower's causal mask as a persistent buffer; CLIPModel
# builds the same mask itself, so it is checked to be that mask and dropped.
CAUSAL_MASK_KEY = "attn_mask"


def convert_open_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An open_clip CLIP state dict (ViT towers, built-in text transformer) under CLIPModel's names.
    A key of no known form is an error naming it; the key sets are compared in ``load_hps_clip``."""
    converted: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key == CAUSAL_MASK_KEY:
            _check_causal_mask(value)
        elif key in _RENAMES:
            converted[_RENAMES[key]] = value
        elif key in _TRANSPOSED:  # open_clip: features @ proj (width, embed); Linear: weight (embed, width)
            converted[_TRANSPOSED[key]] = value.t()
        elif match := _BLOCK.fullmatch(key):
            tower = "vision_model" if match[1] else "text_model"
            prefix = f"{tower}.encoder.layers.{match[2]}."
            part, _, kind = match[3].rpartition(".")
            if part == "attn" and kind in ("in_proj_weight", "in_proj_bias"):
                # nn.MultiheadAttention packs q, k, v along dim 0 in that order
                suffix = "weight" if kind == "in_proj_weight" else "bias"
                for name, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    converted[f"{prefix}self_attn.{name}_proj.{suffix}"] = chunk
            elif part in _BLOCK_PARTS and kind in ("weight", "bias"):
                converted[f"{prefix}{_BLOCK_PARTS[part]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise AssetError(
            f"hpsv2 reward: the checkpoint has keys that are not part of open_clip's ViT CLIP: {unknown}"
        )
    return converted


def _check_causal_mask(mask: Tensor) -> None:
    size = mask.shape[-1]
    causal = torch.full((size, size), float("-inf")).triu(1)
    if mask.shape != (size, size) or not torch.equal(mask.float().cpu(), causal):
        raise AssetError(f"hpsv2 reward: the checkpoint's {CAUSAL_MASK_KEY!r} is not a causal mask")


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The open_clip state dict in an HPS checkpoint: ``torch.load(path)['state_dict']`` as HPSv2's
    ``score`` reads it (a bare state dict is accepted too), with a DataParallel ``module.`` prefix
    removed. Loaded with ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AssetError(f"hpsv2 reward: no HPS checkpoint at {path}; {how_to_get_checkpoint()}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling refused or a corrupt file; report it as an asset problem
        detail = " ".join(str(error).split())
        raise AssetError(
            f"hpsv2 reward: could not read {path} ({type(error).__name__}: {detail}); "
            f"{how_to_get_checkpoint()}"
        ) from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise AssetError(
            f"hpsv2 reward: {path} holds no state dict (a dict of tensors, bare or under 'state_dict'); "
            f"{how_to_get_checkpoint()}"
        )
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def load_hps_clip(state: dict[str, Tensor], config=None) -> nn.Module:
    """A ``CLIPModel`` of ``config`` (ViT-H-14 by default) with every parameter from the open_clip
    state dict ``state``: a missing or unexpected key, or a shape that does not fit, is an error."""
    from transformers import CLIPModel

    clip = CLIPModel(config if config is not None else vit_h_14_config())
    converted = convert_open_clip(state)
    # position_ids are index buffers CLIPModel fills itself (not persistent in recent transformers)
    own = {key: value for key, value in clip.state_dict().items() if key.endswith(".position_ids")}
    expected = set(clip.state_dict()) - set(own)
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise AssetError(
            f"hpsv2 reward: the checkpoint does not fill this CLIP exactly: missing {missing}, unexpected "
            f"{unexpected} (CLIPModel names, converted from open_clip's)"
        )
    try:
        clip.load_state_dict({**converted, **own}, strict=True)
    except RuntimeError as error:  # right names, wrong shapes (another architecture)
        detail = " ".join(str(error).split())
        raise AssetError(f"hpsv2 reward: the checkpoint does not fit this CLIP: {detail}") from None
    return clip


def find_checkpoint() -> Path | None:
    """``HPS_v2.1_compressed.pt`` in the data root, else in the local Hugging Face cache of
    ``xswu/HPSv2`` (where ``hf download`` puts it); None when neither has it."""
    local = data_root() / HPS_FILE
    if local.is_file():
        return local
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(HPS_REPO, HPS_FILE)
    return Path(cached) if isinstance(cached, str) else None


def load_tokenizer(source: str | Path):
    """The CLIP tokenizer at ``source`` (a directory, or a hub id in the local Hugging Face cache)."""
    from transformers import CLIPTokenizer

    tokenizer = load_local("hpsv2", "CLIP tokenizer", source, CLIPTokenizer, HOW_TO_GET_TOKENIZER)
    if len(tokenizer) <= 2:  # transformers 5 builds an empty one when a hub id has no files in the cache
        raise AssetError(
            f"hpsv2 reward: no CLIP tokenizer at {str(source)!r} (looked for a local directory, then for "
            f"that hub id in the local Hugging Face cache: no vocabulary found); {HOW_TO_GET_TOKENIZER}"
        )
    return tokenizer


class HPSv2(nn.Module):
    """Images in [0, 1], (B, 3, H, W) and their prompts -> HPSv2.1 score (B,): the cosine of the
    L2-normalised image and text embeddings, fp32, differentiable in the images."""

    name = "hpsv2"
    differentiable = True

    def __init__(
        self,
        checkpoint_path: str | Path | None = None,
        tokenizer_path: str | Path = TOKENIZER_REPO,
        device: str | torch.device = "cpu",
        config=None,  # a transformers CLIPConfig; ViT-H-14 by default (tests use tiny ones)
    ) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer_path)  # small: checked before the 2 GB checkpoint
        if checkpoint_path is None:
            checkpoint_path = find_checkpoint()
            if checkpoint_path is None:
                raise AssetError(
                    f"hpsv2 reward: no HPS v2.1 checkpoint {HPS_FILE} (looked in the data root "
                    f"{data_root()} and for {HPS_REPO} in the local Hugging Face cache); "
                    f"{how_to_get_checkpoint()}"
                )
        self.clip = load_hps_clip(read_checkpoint(checkpoint_path), config)
        text = self.clip.config.text_config
        if self.tokenizer.eos_token_id != text.eos_token_id or len(self.tokenizer) > text.vocab_size:
            raise AssetError(
                f"hpsv2 reward: the tokenizer at {str(tokenizer_path)!r} does not fit the model (end-of-text "
                f"id {self.tokenizer.eos_token_id} against {text.eos_token_id}, {len(self.tokenizer)} tokens "
                f"against {text.vocab_size}); {HOW_TO_GET_TOKENIZER}"
            )
        self.image_size = int(self.clip.config.vision_config.image_size)
        self.to(device=device, dtype=torch.float32)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> HPSv2:
        """Always eval: a reward is never trained here."""
        return super().train(False)

    def embed_images(self, images: Tensor) -> Tensor:
        """L2-normalised projected image embeddings (B, projection_dim), differentiable in the images."""
        parameter = next(self.clip.parameters())
        pixels = hps_preprocess(images.to(device=parameter.device, dtype=parameter.dtype), self.image_size)
        return unit_features(self.clip.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> Tensor:
        """L2-normalised projected text embeddings (B, projection_dim): 77 tokens, truncated with the
        end-of-text token kept last as open_clip's tokenizer does; no padding mask (open_clip uses the
        causal mask only)."""
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        device = next(self.clip.parameters()).device
        return unit_features(self.clip.get_text_features(input_ids=tokens["input_ids"].to(device)))

    def forward(self, images: Tensor, prompts: list[str], meta: list[dict] | None = None) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        return (self.embed_images(images) * self.embed_prompts(prompts)).sum(-1).float()
