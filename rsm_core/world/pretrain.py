"""Denoising pretraining of the tiny backbones on rendered scenes, with CFG prompt dropout and EMA."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rsm_core.interfaces import Backbone
from rsm_core.optim import fit
from rsm_core.world.dataset import SceneSampler


@dataclass(frozen=True)
class PretrainSettings:
    steps: int
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    cfg_dropout: float = 0.1  # share of prompts replaced by "" so the model learns the unconditional branch
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, max_decay: float) -> None:
    """EMA with warm-up decay min(max_decay, (1 + n)/(10 + n)): a constant 0.999 from the start would
    still hold 0.999^steps of the random initialisation (22 % after 1500 steps)."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - decay)


def pretrain(
    backbone: Backbone,
    scenes: SceneSampler,
    settings: PretrainSettings,
    progress: Callable[[int, float], None] | None = None,
) -> float:
    """Train backbone.model in place (ending with its EMA weights); returns the last batch loss."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    model = backbone.model.train()
    ema = copy.deepcopy(model).requires_grad_(False)

    def step_loss(step: int) -> torch.Tensor:
        images, prompts, _ = scenes(generator, settings.batch)
        drop = torch.rand(len(prompts), generator=generator) < settings.cfg_dropout
        prompts = ["" if d else p for d, p in zip(drop.tolist(), prompts, strict=True)]
        x0 = images * 2 - 1
        noise = torch.randn(x0.shape, generator=generator)
        x_t, t, target = backbone.flow.training_example(x0, noise, generator)
        return F.mse_loss(backbone.native(x_t, t, backbone.encode(prompts)), target)

    loss = fit(
        model.parameters(),
        step_loss,
        settings.steps,
        settings.lr,
        warmup=settings.warmup,
        grad_clip=settings.grad_clip,
        after_step=lambda step: update_ema(ema, model, step, settings.ema_decay),
        progress=progress,
    )
    model.load_state_dict(ema.state_dict())
    model.eval()
    return loss
