"""The mechanism diagnostic: how much of a reward's variance each timestep controls.

For every step i of a sampler grid: run the deterministic ODE trunk from shared starting noise, branch
k children off the trunk state x_i with one SDE step, finish each child with the ODE, and measure the
variance of the terminal reward across the k children (averaged over parents). That is the branching
rollout with k children at every step. A reward that is decided at low-SNR steps varies most when
branching early; one decided by appearance, late (the quantity behind the paper's Eq. 19 and its
branching profiles).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rsm_core.interfaces import Backbone, Reward
from rsm_core.rollout import branching_rollout


@torch.no_grad()
def branch_reward_variance(
    backbone: Backbone,
    rewards: dict[str, Reward],
    prompts: Sequence[str],
    metas: Sequence[dict],
    steps: int,
    children: int,
    cfg: float,
    generator: torch.Generator,
    chunk: int = 256,
) -> dict[str, Tensor]:
    """{reward name: (steps,) mean over parents of the variance across the children of each step}."""
    times, cond = backbone.grid_times(steps), backbone.encode(list(prompts))

    def guided(x: Tensor, step: int, parents: Tensor) -> Tensor:
        return backbone.native(x, times[step], cond[parents], cfg=cfg)

    start = torch.randn(len(prompts), *backbone.latent_shape, generator=generator)
    out = branching_rollout(
        guided,
        backbone.flow.ode_grid(steps),
        backbone.flow.sde_grid(steps),
        start,
        [children] * steps,
        generator,
        chunk,
    )
    images = backbone.decode(out.final)
    row_prompts = [prompts[p] for p in out.parent.tolist()]
    row_metas = [metas[p] for p in out.parent.tolist()]
    variances = {}
    for name, reward in rewards.items():
        values = reward(images, row_prompts, row_metas).float()
        # a step's rows are parent-major with each parent's children contiguous
        variances[name] = torch.stack(
            [values[out.step == i].view(len(prompts), children).var(dim=1).mean() for i in range(steps)]
        )
    return variances
