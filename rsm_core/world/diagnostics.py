"""The mechanism diagnostic: how much of a reward's variance each timestep controls.

For every step i of a sampler grid: run the deterministic ODE trunk from shared starting noise, branch
k children off the trunk state x_i with one SDE step, finish each child with the ODE, and measure the
variance of the terminal reward across the k children (averaged over parents). A reward that is
decided at low-SNR steps varies most when branching early; one decided by appearance, late
(the quantity behind the paper's Eq. 19 and its branching profiles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rsm_core.backbones.base import Backbone

RewardOnImages = Callable[[Tensor, list[str], list[dict]], Tensor]


@torch.no_grad()
def branch_reward_variance(
    backbone: Backbone,
    rewards: dict[str, RewardOnImages],
    prompts: Sequence[str],
    metas: Sequence[dict],
    steps: int,
    children: int,
    cfg: float,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """{reward name: (steps,) mean over parents of the variance across the children of each step}."""
    ode, sde = backbone.flow.ode_kernels(steps), backbone.flow.sde_kernels(steps)
    times = backbone.grid_times(steps)
    cond = backbone.encode(list(prompts))
    trunk, natives = [torch.randn(len(prompts), *backbone.latent_shape, generator=generator)], []
    for i in range(steps):
        natives.append(backbone.native(trunk[i], times[i], cond, cfg=cfg))
        trunk.append(ode[i].mean(trunk[i].double(), natives[i].double()).float())
    repeated_prompts = [p for p in prompts for _ in range(children)]
    repeated_metas = [m for m in metas for _ in range(children)]
    repeated_cond = backbone.encode(repeated_prompts)
    variances = {name: torch.zeros(steps) for name in rewards}
    for i in range(steps):
        x = trunk[i].repeat_interleave(children, 0)
        f = natives[i].repeat_interleave(children, 0)
        noise = torch.randn(x.shape, generator=generator)
        x = sde[i].sample(x.double(), f.double(), noise.double()).float()
        for j in range(i + 1, steps):
            x = ode[j].mean(x.double(), backbone.native(x, times[j], repeated_cond, cfg=cfg).double()).float()
        images = backbone.decode(x)
        for name, reward in rewards.items():
            values = reward(images, repeated_prompts, repeated_metas).float().view(len(prompts), children)
            variances[name][i] = values.var(dim=1).mean()
    return variances
