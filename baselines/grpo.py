"""PPO / GRPO on a Gaussian reverse kernel (theory spec §5.3, Eq. 99-108), as Flow-GRPO writes it.

The policy term is the clipped surrogate on the per-element-mean log-ratio of the step, in the
ratio form max(-A rho, -A clip(rho)) (DDPO, Flow-GRPO) or the log-ratio form
max(-A (1 + log rho), -A clip(1 + log rho)) (PCPO-base); the KL to the reference is Flow-GRPO's
mean_d (mu_theta - mu_ref)^2 / (2 D). Both forms reduce to the canonical loss with
G = 1 A b eps/(2 nu d), P = 1 A b^2/(2 nu^2 d), C1 = alpha_t b^2/(2 nu^2 d); the ratio form carries
the per-sample factor sg(rho) on G and P (its gradient is rho times the log-form gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from baselines.common import (
    KLDenominator,
    clip_advantage,
    kl_scale,
    kl_to_reference,
    mean_log_ratio,
    policy_gradient_coefficients,
)
from baselines.method import Method, Relation, Signal, TableRow
from rsm_core import grids
from rsm_core.loss import Coefficients, Surrogate, clipped_log_ratio, clipped_ratio
from rsm_core.transitions import Transitions

Form = Literal["ratio", "log_ratio"]


@dataclass(frozen=True)
class GRPOConfig:
    form: Form = "ratio"
    clip_range: float = 1e-4  # Flow-GRPO / TempFlow-GRPO eps_c
    adv_clip_max: float = 5.0
    beta: float = 0.01  # the aesthetic runs' KL weight (0.004 for GenEval, 0 for DDPO / PCPO-base)
    kl_denominator: KLDenominator = "heuristic"  # Flow-GRPO's D = sigma_tilde^2, i.e. alpha_t = beta delta_t


_SURROGATES = {"ratio": clipped_ratio, "log_ratio": clipped_log_ratio}


def loss(f_theta: Tensor, rows: Transitions, config: GRPOConfig) -> Surrogate:
    rows.require("noise", "advantage", "f_ref", method="GRPO")
    if config.form not in _SURROGATES:
        raise ValueError(f"unknown GRPO form {config.form!r}; choose one of {sorted(_SURROGATES)}")
    adv = clip_advantage(rows, config.adv_clip_max)
    policy = _SURROGATES[config.form](mean_log_ratio(f_theta, rows), adv, config.clip_range)
    if config.beta == 0:
        return policy
    return Surrogate(
        policy.loss + config.beta * kl_to_reference(f_theta, rows, config.kl_denominator), policy.active
    )


def coefficients(f_theta: Tensor, rows: Transitions, config: GRPOConfig, active: Tensor) -> Coefficients:
    weight = active * clip_advantage(rows, config.adv_clip_max)
    if config.form == "ratio":
        weight = weight * torch.exp(mean_log_ratio(f_theta, rows)).detach()
    alpha = config.beta * kl_scale(rows.kernel, config.kl_denominator)
    return policy_gradient_coefficients(rows.kernel.w, rows.noise, weight, alpha, rows.elements)


_ZO_ROW = dict(
    estimator="ZO",
    lookahead="full rollout",
    branching="$K=1$ (group of $G$ per prompt)",
    temporal_weight=r"$\mathbb{1}$",
    c1=r"$\alpha_t b^2/(2\nu^2 d)$",
    g=r"$\mathbb{1} A b\,\epsilon/(2\nu d)$",
    p=r"$\mathbb{1} A b^2/(2\nu^2 d)$",
)

METHODS = [
    Method(
        name="grpo",
        title="PPO / GRPO (ratio form, Flow-GRPO)",
        grid=grids.sd35_flow_grpo,
        table=TableRow(trust_region=r"clip on $\rho$ ($\times\rho$ per sample)", **_ZO_ROW),
        relation=Relation.RATIO_FACTOR,
        signal=Signal.STEIN,
        config=GRPOConfig(form="ratio"),
        loss=loss,
        coefficients=coefficients,
        needs=("noise", "advantage", "f_ref"),
    ),
    Method(
        name="grpo-log-ratio",
        title="PPO / GRPO (log-ratio form)",
        grid=grids.sd35_flow_grpo,
        table=TableRow(trust_region=r"clip on $1+\log\rho$", **_ZO_ROW),
        relation=Relation.EXACT,
        signal=Signal.STEIN,
        config=GRPOConfig(form="log_ratio"),
        loss=loss,
        coefficients=coefficients,
        needs=("noise", "advantage", "f_ref"),
    ),
]
