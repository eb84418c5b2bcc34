"""GRPO-Guard (theory spec §5.3, Eq. 111-112; zo_flow_tempflow spec §8.1 'guard').

The log-ratio is centred (the negative KL bias mean_d ||mu_theta - mu_old||^2/(2 nu^2) added back)
and rescaled by the step std: log rho~ = nu (log rho + mean_d ||d mu||^2/(2 nu^2)) = <eps, d mu>/d,
which is linear in the native output; the clipped policy term is divided by delta_t. Canonical:
G = 1 rho A b eps/(2 d delta_t) (temporal weight nu_t/delta_t), P = 0: the centring removes the
old-policy anchor.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from rsm_core.kernels import reduce_per_sample
from rsm_core.loss import Coefficients, Surrogate, clipped_ratio
from rsm_core.transitions import Transitions


@dataclass(frozen=True)
class GRPOGuardConfig:
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    beta: float = 0.01  # the Flow-GRPO-family KL as in the shared SD3.5 trainer
    kl_denominator: KLDenominator = "heuristic"


def centred_log_ratio(f_theta: Tensor, rows: Transitions) -> Tensor:
    """nu (log rho + mean_d (mu_theta - mu_old)^2 / (2 nu^2))."""
    kernel = rows.kernel
    shift = kernel.mean(rows.x, f_theta) - kernel.mean(rows.x, rows.f_old).detach()
    bias = reduce_per_sample(shift**2, "mean") / (2 * kernel.nu**2)
    return kernel.nu * (mean_log_ratio(f_theta, rows) + bias)


def loss(f_theta: Tensor, rows: Transitions, config: GRPOGuardConfig) -> Surrogate:
    rows.require("noise", "advantage", "f_ref", method="GRPO-Guard")
    adv = clip_advantage(rows, config.adv_clip_max)
    policy = clipped_ratio(centred_log_ratio(f_theta, rows), adv, config.clip_range)
    kl = kl_to_reference(f_theta, rows, config.kl_denominator)
    return Surrogate(policy.loss / flow_step(rows.kernel) + config.beta * kl, policy.active)


def coefficients(f_theta: Tensor, rows: Transitions, config: GRPOGuardConfig, active: Tensor) -> Coefficients:
    kernel = rows.kernel
    ratio = torch.exp(centred_log_ratio(f_theta, rows)).detach()
    weight = active * clip_advantage(rows, config.adv_clip_max) * ratio * kernel.nu / flow_step(kernel)
    alpha = config.beta * kl_scale(kernel, config.kl_denominator)
    return policy_gradient_coefficients(kernel.w, rows.noise, weight, alpha, rows.elements, anchor=False)


METHOD = Method(
    name="grpo-guard",
    title="GRPO-Guard",
    grid=grids.sd35_flow_grpo,
    table=TableRow(
        estimator="ZO",
        lookahead="full rollout",
        branching="$K=1$ (group of $G$ per prompt)",
        temporal_weight=r"$\mathbb{1}\,\nu_t/\Delta_t$",
        trust_region=r"clip on centred $\rho^{\nu_t}$ ($\times\rho$ per sample)",
        c1=r"$\alpha_t b^2/(2\nu^2 d)$",
        g=r"$\mathbb{1} A b\,\epsilon/(2 d\Delta_t)$",
        p="$0$",
    ),
    relation=Relation.RATIO_FACTOR,
    signal=Signal.STEIN,
    config=GRPOGuardConfig(),
    loss=loss,
    coefficients=coefficients,
    needs=("noise", "advantage", "f_ref"),
)
