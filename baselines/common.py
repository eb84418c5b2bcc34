"""Pieces several published losses share, written the way their code computes them."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rsm_core.flows import per_sample
from rsm_core.kernels import Kernel, reduce_per_sample
from rsm_core.loss import Coefficients, Surrogate
from rsm_core.transitions import Transitions

KLDenominator = Literal["heuristic", "exact"]
# The guard of the published terminal losses (nabla-GFN and VGG-Flow): sum / (n_terminal + 1e-6).
TERMINAL_EPS = 1e-6


def mean_log_ratio(f_theta: Tensor, rows: Transitions) -> Tensor:
    """log p_theta(x_t'|x_t) - log p_old(x_t'|x_t) with per-element-mean log-densities (DDPO, Flow-GRPO)."""
    x_next = rows.x_next.detach()
    new = rows.kernel.log_prob(x_next, rows.x, f_theta, reduction="mean")
    old = rows.kernel.log_prob(x_next, rows.x, rows.f_old, reduction="mean")
    return new - old.detach()


def kl_to_reference(f_theta: Tensor, rows: Transitions, denominator: KLDenominator) -> Tensor:
    """The KL row mean_d (mu_theta - mu_ref)^2 / (2 D) of Flow-GRPO-style code.

    D = nu^2 gives the exact per-element KL. D = sigma_tilde^2 = nu^2 / delta_t is Flow-GRPO's
    "heuristic KL denominator": the exact KL times delta_t, i.e. alpha_t = beta delta_t.
    """
    kernel = rows.kernel
    shift = kernel.mean(rows.x, f_theta) - kernel.mean(rows.x, rows.f_ref).detach()
    return reduce_per_sample(shift**2, "mean") / (2 * kernel.nu**2) * kl_scale(kernel, denominator)


def flow_step(kernel: Kernel) -> Tensor:
    """delta_t = t - t' of a rectified-flow step."""
    if kernel.point.prediction != "v":
        raise ValueError(
            f"delta_t is defined for rectified-flow steps; {kernel.name} is an eps-prediction step"
        )
    return kernel.point.sigma - kernel.prev.sigma


def kl_scale(kernel: Kernel, denominator: KLDenominator) -> Tensor:
    """alpha_t / beta for ``kl_to_reference``: delta_t (heuristic) or 1 (exact)."""
    if denominator == "heuristic":
        return flow_step(kernel)
    if denominator == "exact":
        return torch.ones_like(kernel.nu)
    raise ValueError(f"unknown KL denominator {denominator!r}; choose 'heuristic' or 'exact'")


def clip_advantage(rows: Transitions, limit: float) -> Tensor:
    """The advantages as the losses use them, clipped to [-limit, limit]."""
    return rows.advantage.clamp(-limit, limit)


def policy_gradient_coefficients(
    w: Tensor, noise: Tensor, policy: Tensor, kl: Tensor | float, elements: int, anchor: bool = True
) -> Coefficients:
    """Native-unit coefficients of  policy * (-log rho) + kl * KL  per sample.

    With log rho = (1/d)(-w <df, eps> - (w^2/2)||df||^2) for df = f_theta - f_old (theory spec §1.4)
    and KL = (w^2 / (2d)) ||f_theta - f_ref||^2, matching C1'||.||^2 - 2<G', .> + P'||.||^2 gives
    C1' = kl w^2/(2d), G' = -policy w eps/(2d), P' = policy w^2/(2d) (0 when the surrogate has no
    quadratic old-policy term, as GRPO-Guard's centred log-ratio). ``elements`` = d (1 for sums).
    """
    w_ = per_sample(w, noise)
    c1 = kl * w**2 / (2 * elements)
    g = -per_sample(policy, noise) * w_ * noise / (2 * elements)
    p = policy * w**2 / (2 * elements) if anchor else torch.zeros_like(policy)
    return Coefficients(torch.as_tensor(c1).expand_as(policy), g, p)


def terminal_rows_mean(values: Tensor, terminal: Tensor, group_rows: int) -> Tensor:
    """Per-row terms whose batch mean is the published terminal loss, sum_terminal values / (n + 1e-6)
    over each published microbatch, averaged over microbatches.

    The published codes average a per-row value over the n terminal rows of their microbatch. Their
    microbatch (``group_rows`` rows, consecutive here) need not be ours, which only bounds memory:
    each terminal row carries group_rows / (n_group + 1e-6) times its value and every other row 0, so
    the mean over any multiple of groups is the mean of the groups' published losses (a group without
    terminal rows gives 0, as published).
    """
    rows = values.shape[0]
    if rows % group_rows:
        raise ValueError(
            f"{rows} rows cannot be cut into the published microbatches of {group_rows} rows; make "
            "arm.microbatch_rows a multiple of the loss's terminal_group_rows"
        )
    mask = terminal.to(values.dtype)
    counts = mask.view(-1, group_rows).sum(1, keepdim=True).expand(-1, group_rows).reshape(-1)
    return mask * values * (group_rows / (counts + TERMINAL_EPS))


def row_norm(values: Tensor) -> Tensor:
    """Per row ||values|| over every non-batch dimension, detached. The unpruned algorithms log it for
    their auxiliary network's output and for the reward term it corrects: the ratio of the two is the
    paper's Fig. 8 (it finds the auxiliary output negligible)."""
    return reduce_per_sample(values.detach().double() ** 2, "sum").sqrt()


def logged_surrogate(total: Tensor, terms: dict[str, Tensor]) -> Surrogate:
    """Every row active, with the loss's separate terms (detached) for the arm to log."""
    return Surrogate(
        total,
        torch.ones_like(total, dtype=torch.bool),
        extras={name: value.detach() for name, value in terms.items()},
    )
