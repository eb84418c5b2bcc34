"""The normalised influence metric h(t) of each method on its own grid (theory spec §4, Eq. 20-23).

h(t) = 2 |kappa_t| G_t / g_hat_t is read off the method's declared coefficients, the ones the
checker proves: in native units kappa G is what the method's code multiplies the reward signal by,
so h = 2 |G'| / |g_hat|. Evaluating a method with unit signals on every step of its grid (one latent
element, theta = theta_old = ref, A = r = 1, eps = 1, reward gradient 1) gives h up to the global 1/d.
"""

from __future__ import annotations

import torch
from torch import Tensor

from baselines.method import Method, Signal
from rsm_core.flows import per_sample
from rsm_core.transitions import Transitions


def unit_signal_rows(method: Method) -> Transitions:
    grid = method.grid()
    n = len(grid)
    ones = torch.ones(n, 1, dtype=torch.float64)
    zeros = torch.zeros_like(ones)
    return Transitions(
        kernel=grid.kernel,
        x=zeros,
        f_old=zeros,
        f_ref=zeros,
        noise=ones,
        advantage=ones[:, 0],
        reward=ones[:, 0],
        reward_grad=ones,
        steps_remaining=grid.steps_remaining,
        branch_weight=ones[:, 0],
        lookahead_reward=lambda x_next: x_next.flatten(1).sum(1),  # unit gradient, r = nu > 0
    )


def influence(method: Method) -> Tensor:
    """h(t) at every trained step of the method's grid (up to 1/d)."""
    if not method.reduced:
        raise ValueError(f"{method.name} has no declared reduction, so no influence metric")
    rows = unit_signal_rows(method)
    f_theta = rows.f_old.clone()
    active = method.loss(f_theta, rows, method.config).active
    coef = method.coefficients(f_theta, rows, method.config, active)
    if method.signal is Signal.STEIN:
        signal = per_sample(rows.advantage / rows.kernel.nu, rows.noise) * rows.noise
    else:
        signal = rows.reward_grad
    return (2 * coef.g.abs() / signal.abs()).flatten()
