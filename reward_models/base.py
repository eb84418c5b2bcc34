"""What every reward model offers the trainer (DESIGN.md "Interfaces")."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Reward(Protocol):
    name: str
    differentiable: bool  # True: first-order methods may backpropagate through __call__

    def __call__(self, images: Tensor, prompts: list[str], meta: list[dict] | None = None) -> Tensor:
        """Images in [0, 1], (B, 3, H, W) -> rewards (B,)."""
        ...
