"""The one training loop of the tiny world's models: AdamW, linear warm-up then cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


def fit(
    parameters: Iterable[nn.Parameter],
    step_loss: Callable[[int], Tensor],
    steps: int,
    lr: float,
    warmup: int = 0,
    grad_clip: float | None = None,
    after_step: Callable[[int], None] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> float:
    """Minimise step_loss(step) for ``steps`` AdamW steps (weight decay 1e-4); returns the last loss.

    The learning rate rises linearly over ``warmup`` steps, then follows a half cosine to 0.
    """
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        loss = step_loss(step)
        optimizer.zero_grad()
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step(step)
        if progress is not None:
            progress(step, loss.item())
    return loss.item()
