"""KL-regularised REINFORCE (theory spec §5.3, Eq. 89-98): the full-rollout zeroth-order estimator.

Per transition: -sg(r) log p_theta(x_t'|x_t) + alpha KL(p_theta || p_ref), with the true (summed)
log-density and KL. Its gradient is the canonical one with C1 = alpha b^2/(2 nu^2),
G = r b eps/(2 nu) and P = r b^2/(2 nu^2); P acts only once theta has left theta_old.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from baselines.common import policy_gradient_coefficients
from baselines.method import Method, Relation, Signal, TableRow
from rsm_core import grids
from rsm_core.loss import Coefficients, Surrogate
from rsm_core.transitions import Transitions


@dataclass(frozen=True)
class ReinforceConfig:
    alpha_kl: float = 0.01  # [inferred] the method has no published value; any alpha >= 0


def loss(f_theta: Tensor, rows: Transitions, config: ReinforceConfig) -> Surrogate:
    rows.require("noise", "reward", "f_ref", method="REINFORCE + KL")
    log_prob = rows.kernel.log_prob(rows.x_next.detach(), rows.x, f_theta, reduction="sum")
    kl = rows.kernel.kl(f_theta, rows.f_ref.detach(), reduction="sum")
    per_sample = -rows.reward * log_prob + config.alpha_kl * kl
    return Surrogate(per_sample, torch.ones_like(per_sample, dtype=torch.bool))


def coefficients(f_theta: Tensor, rows: Transitions, config: ReinforceConfig, active: Tensor) -> Coefficients:
    return policy_gradient_coefficients(rows.kernel.w, rows.noise, rows.reward, config.alpha_kl, elements=1)


METHOD = Method(
    name="reinforce-kl",
    title="REINFORCE + KL",
    grid=grids.sd15_ddpm,
    table=TableRow(
        estimator="ZO",
        lookahead="full rollout",
        branching="$K=1$",
        temporal_weight="$1$",
        trust_region="none",
        c1=r"$\alpha b^2/(2\nu^2)$",
        g=r"$r\,b\,\epsilon/(2\nu)$",
        p=r"$r\,b^2/(2\nu^2)$ (inactive at $\theta_{old}$)",
    ),
    relation=Relation.EXACT,
    signal=Signal.STEIN,
    config=ReinforceConfig(),
    loss=loss,
    coefficients=coefficients,
    needs=("noise", "reward", "f_ref"),
)
