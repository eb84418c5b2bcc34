"""The types every layer of the harness agrees on, one of each (docs/design.md).

- ``Reward``: a reward model on images (tiny world or paper scale, black box or differentiable);
  ``SampleReward``: a reward already bound to its prompts and decoder, on clean samples (the toy,
  estimators, first-order losses).
- ``Backbone``: a flow or diffusion model with its conditioning, native output (with and without a
  named LoRA adapter) and decoder.
- ``ParamGroup``: trainable parameters with their own optimiser settings.
- ``Objective``: what a method gives an arm — its per-row loss, its KL to the reference and its
  diagnostics, bound to the method's hyperparameters — so an arm never branches on a method's name.
- ``Arm``: one method on one backbone and one data shard, as the trainer drives it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rsm_core.loss import Surrogate
from rsm_core.transitions import Transitions


class Reward(Protocol):
    name: str
    differentiable: bool  # True: first-order methods may backpropagate through __call__

    def __call__(self, images: Tensor, prompts: list[str], meta: list[dict] | None = None) -> Tensor:
        """Images in [0, 1], (B, 3, H, W) -> rewards (B,)."""
        ...


SampleReward = Callable[[Tensor], Tensor]  # clean samples (B, *D) -> rewards (B,), prompts bound


class Backbone(Protocol):
    """Implemented by ``rsm_core.backbones.base.BackboneBase`` (tiny flow / diffusion, SD3.5-M, SD1.5)."""

    model: nn.Module
    lora_targets: tuple[str, ...]
    autocast_dtype: torch.dtype | None  # the forward's autocast precision (None: full precision)

    @property
    def flow(self) -> Any: ...  # rsm_core.backbones.base.FlowSpec

    @property
    def latent_shape(self) -> tuple[int, ...]: ...

    def encode(self, prompts: Sequence[str]) -> Any: ...  # Cond, cached per prompt; "" is unconditional

    def native(
        self,
        x: Tensor,
        t: Tensor | float,
        cond: Any,
        *,
        cfg: float | None = None,
        adapter: str | None = ...,
        detach_uncond: bool = False,
        guidance_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """eps or v; ``adapter=None`` runs the frozen reference (every adapter disabled)."""
        ...

    def decode(self, latents: Tensor) -> Tensor: ...  # images in [0, 1], differentiable

    def add_lora(
        self,
        rank: int,
        alpha: float,
        init: str | bool = "gaussian",
        name: str = ...,
        targets: Sequence[str] = (),
    ) -> None: ...

    def adapter_parameters(self, name: str = ...) -> list[nn.Parameter]: ...

    def sample_ode(
        self,
        prompts: Sequence[str],
        steps: int,
        cfg: float | None,
        generator: torch.Generator | None = None,
        *,
        start: Tensor | None = None,
        observe: Callable[[int, Tensor, Tensor], None] | None = None,
        until: int | None = None,
        guidance_dtype: torch.dtype | None = None,
    ) -> Tensor: ...

    def grid_times(self, steps: int) -> Tensor: ...


@dataclass
class ParamGroup:
    """Parameters trained together. ``None`` settings take the loop's (``LoopConfig``) values, so a
    policy group needs only its name; an auxiliary network (a value or residual net) sets its own."""

    name: str
    params: list[nn.Parameter]
    lr: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None  # per-group grad-norm clip; 0 or less: no clip
    ema: bool | None = None  # keep an EMA of this group (evaluation swaps it in)


@dataclass(frozen=True)
class Objective:
    """A method's per-row pieces, bound to its config by the method's registry entry."""

    name: str  # the registered method (for messages and run records, never for branching)
    loss: Callable[[Tensor, Transitions], Surrogate]  # per-row loss, trust region and KL included
    # per-row KL to the reference (e.g. ODE-anchor rows); None where no arm of the method needs it
    kl: Callable[[Tensor, Transitions], Tensor] | None
    beta: float  # the KL coefficient the loss applies (anchor rows use the same)
    # per-row diagnostics (averaged by the arm over the counted rows), from the loss's own quantities
    diagnostics: Callable[[Tensor, Transitions, Surrogate], dict[str, Tensor]] | None
    needs: tuple[str, ...] = ()  # Transitions fields the loss reads


def check_needs(objective: Objective, provides: Sequence[str], arm: str) -> None:
    """Fail at construction when a method's loss reads row fields this arm kind never fills."""
    missing = [name for name in objective.needs if name not in provides]
    if missing:
        raise ValueError(
            f"{objective.name} needs the row fields {missing}, which the {arm} arm does not fill (it "
            f"provides {list(provides)}); train it with another arm kind"
        )


class Arm(Protocol):
    """One method on one backbone and one data shard: what the loop calls, in this order."""

    generator: torch.Generator  # every random draw of the shard (rollout noise, shuffles)

    def param_groups(self) -> list[ParamGroup]: ...

    def collect(self, budget: Any) -> Any:
        """Roll out, score and compute advantages; time the "sample" and "reward" phases in budget."""

    def microbatches(self, batch: Any, count_multiple: int) -> list[Any]:
        """The epoch's rows shuffled and cut into a number of microbatches divisible by count_multiple."""

    def loss(self, microbatch: Any) -> tuple[Tensor, dict[str, float]]:
        """The microbatch's scalar loss (the loop averages microbatches and shards) and its stats."""

    def batch_stats(self, batch: Any) -> dict[str, float]:
        """Means over the shard's rows (shards are averaged)."""

    def evaluate(self, part: int, parts: int) -> dict[str, Tensor]:
        """Per-item values (1-D) of this ``part`` of ``parts`` of the fixed test set, with the weights
        currently loaded (the loop swaps the EMA in, gathers the parts and logs means and spreads)."""

    def state(self) -> dict[str, Any]:
        """JSON-able sampler state beyond the generator (e.g. how many prompt draws were made)."""

    def state_tensors(self) -> dict[str, Tensor]:
        """Tensor state a checkpoint must keep beyond the weights (e.g. a replay buffer)."""

    def load_state(self, state: dict[str, Any], tensors: dict[str, Tensor]) -> None: ...
