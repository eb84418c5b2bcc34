"""TempFlow-GRPO's per-row objective (zo_flow_tempflow spec §8-9; theory spec §5.3, Eq. 113).

A row is one child of a branching rollout: the trunk state x_t, one Flow-GRPO SDE step, then ODE to
the end. The published "ppo" objective weights the clipped ratio surrogate by TempFlow's noise
weight 2.25 nu_t outside the clip; the "matching" objective puts that weight inside:
max(eps_c |A| + A 2.25 nu_t (T1 + T2), 0) with T1 + T2 = -log rho. Both rows and their KL to the
reference carry the branch-count weight k_avg / k_i, and rows with a zero advantage are masked
(policy and KL). Canonical (per child): G = 1 gamma A b eps/(2 nu d), P = 1 gamma A b^2/(2 nu^2 d),
C1 = alpha_t b^2/(2 nu^2 d), gamma = 2.25 nu_t, all times k_avg / k_i; the "ppo" form carries
sg(rho) on G and P.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from baselines.common import (
    KLDenominator,
    clip_advantage,
    flow_step,
    kl_scale,
    kl_to_reference,
    mean_log_ratio,
    policy_gradient_coefficients,
)
from baselines.method import Method, Relation, Signal, TableRow
from rsm_core import grids
from rsm_core.loss import Coefficients, Surrogate, clipped_ratio, matching
from rsm_core.transitions import Transitions

Objective = Literal["ppo", "matching"]
# The reweight options of the published trainer (spec §8.1-8.2); Figure 3's redesigns use fair_clip,
# the GenEval redesign fair_clip2 (fair clipping with GRPO-Guard's temporal weight nu_t / delta_t).
Reweight = Literal["base", "tempflow", "fair_clip", "fair_clip2"]


@dataclass(frozen=True)
class TempFlowConfig:
    objective: Objective = "ppo"
    reweight: Reweight = "tempflow"
    # Hard-coded in the published code; 1 / mean_t nu_t = 2.2522 over the 9 trained SD3.5 steps, so
    # the weights average to about one there.
    noise_weight_scale: float = 2.25
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    beta: float = 0.01  # Fig. 3 (aesthetic); 0.004 for GenEval
    kl_denominator: KLDenominator = "heuristic"  # Fig. 3; "exact" for GenEval


def noise_weight(rows: Transitions, config: TempFlowConfig) -> Tensor:
    """TempFlow's gamma_t = 2.25 nu_t."""
    return config.noise_weight_scale * rows.kernel.nu


def clip_scale_and_weight(rows: Transitions, config: TempFlowConfig) -> tuple[Tensor, Tensor]:
    """(kappa_t, lambda_t): the clip acts on kappa_t log rho and lambda_t multiplies the clipped term.

    Spec §8.1/8.2: tempflow puts 2.25 nu_t outside the clip for "ppo" and inside for "matching";
    fair clipping clips nu_t^2 log rho (a mean shift in latent units) and divides by nu_t^2 outside,
    times GRPO-Guard's nu_t / delta_t for fair_clip2.
    """
    one = torch.ones_like(rows.kernel.nu)
    nu = rows.kernel.nu
    if config.reweight == "base":
        return one, one
    if config.reweight == "tempflow":
        gamma = noise_weight(rows, config)
        return (one, gamma) if config.objective == "ppo" else (gamma, one)
    if config.reweight == "fair_clip":
        return nu**2, 1 / nu**2
    if config.reweight == "fair_clip2":
        if config.objective == "ppo":
            raise ValueError(
                "reweight fair_clip2 exists only for objective 'matching' (as in the published code)"
            )
        return nu**2, 1 / (nu * flow_step(rows.kernel))
    raise ValueError(
        f"unknown TempFlow reweight {config.reweight!r}; choose base, tempflow, fair_clip or fair_clip2"
    )


def row_weight(rows: Transitions) -> Tensor:
    """k_avg / k_i on rows with a non-zero advantage, 0 on masked rows."""
    return rows.branch_weight * (rows.advantage != 0)


def loss(f_theta: Tensor, rows: Transitions, config: TempFlowConfig) -> Surrogate:
    rows.require("noise", "advantage", "f_ref", "branch_weight", method="TempFlow-GRPO")
    adv = clip_advantage(rows, config.adv_clip_max)
    scale, weight = clip_scale_and_weight(rows, config)
    scaled_log_ratio = scale * mean_log_ratio(f_theta, rows)
    if config.objective == "ppo":
        policy = clipped_ratio(scaled_log_ratio, adv, config.clip_range)
    elif config.objective == "matching":
        policy = matching(scaled_log_ratio, adv, config.clip_range)
    else:
        raise ValueError(f"unknown TempFlow objective {config.objective!r}; choose 'ppo' or 'matching'")
    kl = kl_to_reference(f_theta, rows, config.kl_denominator)
    return Surrogate(row_weight(rows) * (weight * policy.loss + config.beta * kl), policy.active)


def coefficients(f_theta: Tensor, rows: Transitions, config: TempFlowConfig, active: Tensor) -> Coefficients:
    scale, weight = clip_scale_and_weight(rows, config)
    policy = row_weight(rows) * active * clip_advantage(rows, config.adv_clip_max) * scale * weight
    if config.objective == "ppo":
        policy = policy * torch.exp(scale * mean_log_ratio(f_theta, rows)).detach()
    alpha = row_weight(rows) * config.beta * kl_scale(rows.kernel, config.kl_denominator)
    return policy_gradient_coefficients(rows.kernel.w, rows.noise, policy, alpha, rows.elements)


def microbatch_loss(rows_loss: Tensor, rows: Transitions) -> Tensor:
    """sum(row loss over valid rows) / max(#valid, 1); valid = non-zero advantage (padding is dropped
    before the rows get here)."""
    valid = rows.advantage != 0
    return (rows_loss * valid).sum() / valid.sum().clamp(min=1)


_ROW = dict(
    estimator="ZO",
    lookahead="one SDE step, then ODE (localised)",
    branching="$K_t=6$ at each of 9 steps",
    temporal_weight=r"$\mathbb{1}\cdot 2.25\,\nu_t$",
    c1=r"$\alpha_t b^2/(2\nu^2 d)$",
    g=r"$\mathbb{1}\gamma A b\,\epsilon/(2\nu d)$ per child",
    p=r"$\mathbb{1}\gamma A b^2/(2\nu^2 d)$ ($\Sigma\approx 0$ over a centred group)",
)

METHODS = [
    Method(
        name="tempflow-grpo",
        title="TempFlow-GRPO (ppo)",
        grid=grids.sd35_flow_grpo,
        table=TableRow(trust_region=r"clip on $\rho$ ($\times\rho$ per sample)", **_ROW),
        relation=Relation.RATIO_FACTOR,
        signal=Signal.STEIN,
        config=TempFlowConfig(),
        loss=loss,
        coefficients=coefficients,
        needs=("noise", "advantage", "f_ref", "branch_weight"),
        note="alpha_t = beta delta_t (heuristic KL denominator); rows weighted by k_avg / k_i",
    ),
    Method(
        name="tempflow-grpo-matching",
        title="TempFlow-GRPO (matching)",
        grid=grids.sd35_flow_grpo,
        table=TableRow(trust_region=r"clip on $\gamma_t\log\rho$", **_ROW),
        relation=Relation.EXACT,
        signal=Signal.STEIN,
        config=TempFlowConfig(objective="matching"),
        loss=loss,
        coefficients=coefficients,
        needs=("noise", "advantage", "f_ref", "branch_weight"),
    ),
]
