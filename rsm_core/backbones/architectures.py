"""The published networks' configs, to build the real diffusers classes without their weights.

On the meta device a model costs no memory, so the LoRA a method would wrap (modules, parameters) can
be counted, and memory planned, for SD3.5-M and SD1.5 on a machine that has neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rsm_core.backbones.base import ATTENTION_PROJECTIONS

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json: 24 MMDiT blocks of width 1536, the
# MMDiT-X second self-attention (attn2) in blocks 0-12, RMS qk-norm.
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}

# stable-diffusion-v1-5, unet/config.json (the fields that differ from UNet2DConditionModel's defaults
# or fix the shapes): CLIP-L text states of width 768, 64x64 latents.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

# The image decoders' shapes (the fields that fix them; scaling factors do not change bytes).
# stabilityai/stable-diffusion-3.5-medium, vae/config.json: AutoencoderKL, 16 latent channels, no quant convs.
SD35_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# stable-diffusion-v1-5, vae/config.json: the same blocks with 4 latent channels and the quant convs.
SD15_VAE: dict[str, Any] = {
    **SD35_VAE,
    "latent_channels": 4,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}
# madebyollin/taesd3: AutoencoderTiny with 16 latent channels; the other fields are assumed to be
# diffusers' defaults (TAESD's published 64-channel blocks), its config file was not read here.
TAESD3: dict[str, Any] = {"latent_channels": 16}
DECODERS = {
    "sd35-vae": ("AutoencoderKL", SD35_VAE),
    "sd15-vae": ("AutoencoderKL", SD15_VAE),
    "taesd3": ("AutoencoderTiny", TAESD3),
}


# The joint-attention projections of every MMDiT block (image and text streams), the published
# TempFlow-GRPO / Flow-GRPO targets; not attn2 (MMDiT-X), MLPs, norms or embedders.
SD35_JOINT_ATTENTION = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]


# What each published code base wraps (all with PEFT's gaussian init), by backbone and method family.
PUBLISHED_LORA: dict[tuple[str, str], LoraSpec] = {
    ("sd35", "zeroth-order"): LoraSpec(32, 64.0, SD35_JOINT_ATTENTION),  # TempFlow-GRPO
    ("sd35", "first-order"): LoraSpec(8, 8.0, ATTENTION_PROJECTIONS),  # VGG-Flow: attn and attn2
    ("sd15", "zeroth-order"): LoraSpec(16, 16.0, ATTENTION_PROJECTIONS),  # PCPO and its redesign
    ("sd15", "first-order"): LoraSpec(8, 8.0, ATTENTION_PROJECTIONS),  # SQDF, Residual nabla-DB
}


def sd35_medium_transformer(device: str | torch.device = "meta", **overrides: Any) -> nn.Module:
    """SD3.5-M's transformer (``overrides`` e.g. num_layers for a reduced-depth copy)."""
    from diffusers import SD3Transformer2DModel

    with torch.device(device):
        return SD3Transformer2DModel(**{**SD35_MEDIUM_TRANSFORMER, **overrides})


def sd15_unet(device: str | torch.device = "meta", **overrides: Any) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**{**SD15_UNET, **overrides})


def image_decoder(name: str, device: str | torch.device = "meta", **overrides: Any) -> nn.Module:
    """A published image decoder (``DECODERS``: the SD3.5-M or SD1.5 VAE, TAESD3) without weights."""
    import diffusers

    class_name, config = DECODERS[name]
    with torch.device(device):
        return getattr(diffusers, class_name)(**{**config, **overrides})


@dataclass(frozen=True)
class LoraCount:
    modules: int  # layers the adapter wraps
    parameters: int  # its trainable weights (A and B of every wrapped layer)


def count_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float) -> LoraCount:
    """Wrap ``model`` with one peft LoRA adapter on ``targets`` and count what it adds."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets))
    model = inject_adapter_in_model(config, model)
    modules = sum(isinstance(m, LoraLayer) for m in model.modules())
    parameters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return LoraCount(modules, parameters)
