"""The tiny world's backbones: the same diffusers classes as SD3.5-M and SD1.5, in pixel space.

- tiny flow: ``SD3Transformer2DModel`` (patch 2), rectified flow, velocity prediction;
- tiny diffusion: ``UNet2DConditionModel`` (cross-attention at the lower resolution only), SD1.5's
  scaled-linear 1000-step schedule, eps prediction.
Both condition on the tiny text encoder (token states; the flow model also takes the pooled vector).
Pixels live in [-1, 1]; decode maps them to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rsm_core import flows
from rsm_core.backbones.base import BackboneBase, FlowSpec
from rsm_core.backbones.text import Cond, TinyTextEncoder


@dataclass(frozen=True)
class TinyFlowConfig:
    resolution: int = 32
    channels: int = 3
    patch_size: int = 2
    layers: int = 4
    heads: int = 3
    head_dim: int = 32
    shift: float = 3.0


@dataclass(frozen=True)
class TinyDiffusionConfig:
    resolution: int = 32
    channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64)
    head_dim: int = 8


def pixels_to_images(x: Tensor) -> Tensor:
    """[-1, 1] pixels -> [0, 1] images (differentiable inside the range)."""
    return ((x + 1) / 2).clamp(0, 1)


class _TinyBackbone(BackboneBase):
    def __init__(self, text_encoder: TinyTextEncoder) -> None:
        super().__init__()
        self.text_encoder = text_encoder.requires_grad_(False).eval()

    def _encode(self, prompts: Sequence[str]) -> Cond:
        return self.text_encoder(prompts)

    def decode(self, latents: Tensor) -> Tensor:
        return pixels_to_images(latents)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.config.channels, self.config.resolution, self.config.resolution)


class TinyFlow(_TinyBackbone):
    def __init__(self, text_encoder: TinyTextEncoder, config: TinyFlowConfig = TinyFlowConfig()) -> None:
        from diffusers import SD3Transformer2DModel

        super().__init__(text_encoder)
        width = text_encoder.config.width
        self.config = config
        self.flow = FlowSpec("rf-v", shift=config.shift)
        self.model = SD3Transformer2DModel(
            sample_size=config.resolution,
            patch_size=config.patch_size,
            in_channels=config.channels,
            out_channels=config.channels,
            num_layers=config.layers,
            attention_head_dim=config.head_dim,
            num_attention_heads=config.heads,
            joint_attention_dim=width,
            caption_projection_dim=config.heads * config.head_dim,
            pooled_projection_dim=width,
            pos_embed_max_size=config.resolution // config.patch_size,
        )

    def _forward(self, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        return self.model(
            x, encoder_hidden_states=cond.tokens, pooled_projections=cond.pooled, timestep=timestep
        ).sample


class TinyDiffusion(_TinyBackbone):
    output_layer = "conv_out"

    def __init__(
        self, text_encoder: TinyTextEncoder, config: TinyDiffusionConfig = TinyDiffusionConfig()
    ) -> None:
        from diffusers import UNet2DConditionModel

        super().__init__(text_encoder)
        self.config = config
        self.flow = FlowSpec("vp-eps", alphas_cumprod=flows.vp_alphas_cumprod(dtype=torch.float32))
        self.model = UNet2DConditionModel(
            sample_size=config.resolution,
            in_channels=config.channels,
            out_channels=config.channels,
            block_out_channels=config.block_out_channels,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=text_encoder.config.width,
            attention_head_dim=config.head_dim,
            norm_num_groups=8,
        )

    def _forward(self, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        return self.model(
            x, timestep, encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask
        ).sample
