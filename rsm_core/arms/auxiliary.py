"""The auxiliary networks of the unpruned first-order algorithms, trained beside the policy.

- ``value_adapter``: VGG-Flow's value network g_psi (fo_first_order spec §B.5). Published as a deep
  copy of the transformer with its own LoRA (rank 8, alpha 8, the policy's targets) whose output
  layer is made trainable and scaled by 1e-5 at init, so g_psi starts near zero. Here it is a second
  LoRA adapter on the same backbone with a trainable copy of the output layer: the same function,
  since the copied base weights are frozen in both, without a second copy of them in memory.
- ``residual_unet``: nabla-GFN's residual network g_phi (spec §A.6), a small ``UNet2DConditionModel``
  (channels (64, 128, 256, 256), one layer per block, cross-attention on the prompt tokens) with the
  output convolution's bias zeroed, in fp32.

Several data shards of one process share a backbone, so they share its auxiliary network too:
``attach`` builds it once per backbone.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from rsm_core.backbones.text import Cond
from rsm_core.interfaces import Backbone, ParamGroup

AuxiliaryKind = Literal["none", "value_adapter", "residual_unet"]
VALUE = "value"  # the value network's adapter name


@dataclass(frozen=True)
class AuxiliarySettings:
    kind: AuxiliaryKind
    lora_rank: int
    lora_alpha: float
    head_scale: float
    residual_channels: tuple[int, ...]
    lr: float | None
    weight_decay: float | None
    max_grad_norm: float | None


class ValueAdapter:
    """g_psi(x, t, cond): the backbone through the value adapter, unguided."""

    def __init__(self, backbone: Backbone, settings: AuxiliarySettings) -> None:
        self.backbone = backbone
        backbone.add_lora(
            settings.lora_rank,
            settings.lora_alpha,
            name=VALUE,
            trainable_copies=(backbone.output_layer,),
        )
        with torch.no_grad():
            backbone.trainable_copy(backbone.output_layer, VALUE).weight.mul_(settings.head_scale)

    def parameters(self) -> list[nn.Parameter]:
        return self.backbone.adapter_parameters(VALUE)

    def __call__(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.backbone.native(x, t, cond, cfg=None, adapter=VALUE)


class ResidualUNet:
    """g_phi(x, t, cond): a small conditional UNet on the backbone's latents, in fp32 on the backbone's
    device."""

    def __init__(self, backbone: Backbone, settings: AuxiliarySettings) -> None:
        from diffusers import UNet2DConditionModel

        self.backbone = backbone
        channels, side = backbone.latent_shape[0], backbone.latent_shape[-1]
        widths = settings.residual_channels
        tokens = backbone.encode([""]).tokens
        # diffusers' default block types, cut to the number of widths: cross-attention at every
        # resolution but the lowest
        down = ("CrossAttnDownBlock2D",) * (len(widths) - 1) + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(widths) - 1)
        self.net = UNet2DConditionModel(
            sample_size=side,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=widths,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=1,
            cross_attention_dim=tokens.shape[-1],
            norm_num_groups=min(32, *widths),
        ).to(_device(backbone), torch.float32)
        with torch.no_grad():
            self.net.conv_out.bias.zero_()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def __call__(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        device = _device(self.backbone)
        timestep = self.backbone.flow.model_timestep(torch.as_tensor(t, device=x.device).expand(x.shape[0]))
        out = self.net(
            x.to(device, torch.float32),
            timestep.to(device),
            encoder_hidden_states=cond.tokens.to(device, torch.float32),
            encoder_attention_mask=cond.mask.to(device),
        ).sample
        return out.to(x.device, x.dtype)


Auxiliary = ValueAdapter | ResidualUNet
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _device(backbone: Backbone) -> torch.device:
    return next(backbone.model.parameters()).device


def attach(backbone: Backbone, settings: AuxiliarySettings, seed: int) -> Auxiliary:
    """The backbone's auxiliary network, built on first use with weights drawn from ``seed`` (the same
    on every process, like the policy's LoRA)."""
    if backbone in _ATTACHED:
        network = _ATTACHED[backbone]
        if not isinstance(network, _KINDS[settings.kind]):
            raise ValueError(
                f"the backbone already carries a {type(network).__name__}, not a {settings.kind}"
            )
        return network
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = _KINDS[settings.kind](backbone, settings)
    _ATTACHED[backbone] = network
    return network


def param_group(network: Auxiliary, settings: AuxiliarySettings) -> ParamGroup:
    """Its own AdamW group and clip; None settings take the loop's. No EMA: evaluation runs the policy."""
    name = VALUE if isinstance(network, ValueAdapter) else "residual"
    return ParamGroup(
        name,
        network.parameters(),
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        ema=False,
    )


_KINDS: dict[str, type] = {"value_adapter": ValueAdapter, "residual_unet": ResidualUNet}
