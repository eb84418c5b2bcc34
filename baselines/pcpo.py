"""PCPO (zo_diffusion_pcpo spec §2-3; theory spec §5.3): the clipped log-ratio surrogate and its
constant-weight ("reweight") variants.

- PCPO-base is GRPO's log-ratio form on SD1.5's DDPM kernel, without KL.
- PCPO-reweight (diffusion, "uw-sigma"): sampling uses PCPO's std nu', and the loss replaces the
  kernel weight w_t by the constant w_bar = W / S (W = 4.5, S = 8.70575, so w_bar = mean_t w_t of the
  DDPM grid): m = 1/2 mean_d (w_bar d_eps)^2 + mean_d (w_bar d_eps z), loss max(0, eps_c |A| + A m).
  Canonical: G = 1 A w_bar eps/(2 |kappa| d), P = 1 A w_bar^2/(2 kappa^2 d), C1 = 0.
- PCPO-reweight (flow, the 'ppo' path): the ratio's exponent is multiplied by m_t = zeta delta_t / w_t,
  rho = exp(m_t log rho); G and P are the GRPO ones times m_t (and sg(rho)).

``weighted_log_ratio`` is the matching loss's log-ratio with the kernel weight replaced; TempFlow-GRPO's
"pcpo" reweight uses it and ``ZETA`` too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from baselines import grpo
from baselines.common import (
    clip_advantage,
    flow_step,
    kl_scale,
    kl_to_reference,
    mean_log_ratio,
    policy_gradient_coefficients,
)
from baselines.method import Method, Relation, Signal, TableRow
from rsm_core import grids
from rsm_core.flows import per_sample
from rsm_core.kernels import reduce_per_sample
from rsm_core.loss import Coefficients, Surrogate, clipped_ratio, matching
from rsm_core.transitions import Transitions

# The flow reweight's constant (published, both in PCPO's flow code and in TempFlow-GRPO's trainer);
# its normalisation rule is not pinned.
ZETA = 4.3152134639895925


def weighted_log_ratio(f_theta: Tensor, rows: Transitions, weight: Tensor | float) -> Tensor:
    """-(1/2 mean_d (w df)^2 + mean_d (w df eps)), df = f_theta - f_old, from the stored noise eps.

    With w = w_t this is log rho (theory spec §1.4); with another w it is the log-ratio of a kernel
    of that weight, which is how the PCPO reweights replace w_t inside the matching loss.
    """
    weighted = per_sample(weight, f_theta) * (f_theta - rows.f_old.detach())
    return -(0.5 * reduce_per_sample(weighted**2, "mean") + reduce_per_sample(weighted * rows.noise, "mean"))


# --- PCPO-reweight on diffusion ("uw-sigma") ---------------------------------------------------


@dataclass(frozen=True)
class PCPODiffusionConfig:
    const_weight: float = 4.5  # W: the sampler's std solves (c1 + c2)/nu' = W
    weight_scale_factor: float = 8.70575076181  # S = W / mean_t w_t over the 50-step DDPM grid
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0

    @property
    def loss_weight(self) -> float:
        """w_bar = W / S = 0.5169, the constant that replaces w_t in the loss."""
        return self.const_weight / self.weight_scale_factor


def reweight_loss(f_theta: Tensor, rows: Transitions, config: PCPODiffusionConfig) -> Surrogate:
    rows.require("noise", "advantage", method="PCPO-reweight")
    # "bad" noise-matching precision, as published: the theta-free 1/2 mean_d z^2 is left out.
    # matching(-m) is max(eps_c |A| + A m, 0): -m is the log-ratio of a kernel of weight w_bar.
    log_ratio = weighted_log_ratio(f_theta, rows, config.loss_weight)
    return matching(log_ratio, clip_advantage(rows, config.adv_clip_max), config.clip_range)


def approx_kl(f_theta: Tensor, rows: Transitions, config: PCPODiffusionConfig) -> Tensor:
    """The published ``approx_kl``: 1/2 mean_d (W (eps_theta - eps_ref))^2 with W = 4.5, not W / S.
    PCPO logs it per row and on the evaluation's KL axis; the redesign also trains its ODE anchors with
    it. It is a proxy: the kernel's exact KL weights each step by its own w'_t (spec §5)."""
    rows.require("f_ref", method="PCPO approx_kl")
    return 0.5 * reduce_per_sample((config.const_weight * (f_theta - rows.f_ref)) ** 2, "mean")


def diagnostics(
    f_theta: Tensor, rows: Transitions, config: PCPODiffusionConfig, surrogate: Surrogate
) -> dict[str, Tensor]:
    """Per row, as published: ``clipfrac`` (eps_c |A| + A m < 0: the row's trust region has closed)
    and ``approx_kl``."""
    adv = clip_advantage(rows, config.adv_clip_max)
    log_ratio = weighted_log_ratio(f_theta, rows, config.loss_weight)  # -m
    closed = config.clip_range * adv.abs() - adv * log_ratio < 0
    return {"clipfrac": closed.double(), "approx_kl": approx_kl(f_theta, rows, config)}


def reweight_coefficients(
    f_theta: Tensor, rows: Transitions, config: PCPODiffusionConfig, active: Tensor
) -> Coefficients:
    weight = active * clip_advantage(rows, config.adv_clip_max)
    w_bar = torch.full_like(weight, config.loss_weight)
    return policy_gradient_coefficients(w_bar, rows.noise, weight, 0.0, rows.elements)


# --- PCPO-reweight on flow ---------------------------------------------------------------------


@dataclass(frozen=True)
class PCPOFlowConfig:
    zeta: float = ZETA
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    beta: float = 0.01
    kl_denominator: grpo.KLDenominator = "heuristic"


def _exponent_scale(rows: Transitions, config: PCPOFlowConfig) -> Tensor:
    """m_t = zeta delta_t / w_t."""
    return config.zeta * flow_step(rows.kernel) / rows.kernel.w


def flow_loss(f_theta: Tensor, rows: Transitions, config: PCPOFlowConfig) -> Surrogate:
    rows.require("noise", "advantage", "f_ref", method="PCPO-reweight (flow)")
    log_ratio = _exponent_scale(rows, config) * mean_log_ratio(f_theta, rows)
    policy = clipped_ratio(log_ratio, clip_advantage(rows, config.adv_clip_max), config.clip_range)
    kl = kl_to_reference(f_theta, rows, config.kl_denominator)
    return Surrogate(policy.loss + config.beta * kl, policy.active)


def flow_coefficients(
    f_theta: Tensor, rows: Transitions, config: PCPOFlowConfig, active: Tensor
) -> Coefficients:
    scale = _exponent_scale(rows, config)
    ratio = torch.exp(scale * mean_log_ratio(f_theta, rows)).detach()
    weight = active * clip_advantage(rows, config.adv_clip_max) * ratio * scale
    alpha = config.beta * kl_scale(rows.kernel, config.kl_denominator)
    return policy_gradient_coefficients(rows.kernel.w, rows.noise, weight, alpha, rows.elements)


METHODS = [
    Method(
        name="pcpo-base",
        title="PCPO-base (clipped log-ratio)",
        grid=grids.sd15_ddpm,
        table=TableRow(
            estimator="ZO",
            lookahead="full rollout",
            branching="$K=1$ (group of $G$ per prompt)",
            temporal_weight=r"$\mathbb{1}$",
            trust_region=r"clip on $1+\log\rho$",
            c1="$0$",
            g=r"$\mathbb{1} A b\,\epsilon/(2\nu d)$",
            p=r"$\mathbb{1} A b^2/(2\nu^2 d)$",
        ),
        relation=Relation.EXACT,
        signal=Signal.STEIN,
        config=grpo.GRPOConfig(form="log_ratio", beta=0.0, kl_denominator="exact"),
        loss=grpo.loss,
        coefficients=grpo.coefficients,
        needs=("noise", "advantage", "f_ref"),
        note="the SD1.5 PCPO config has no KL term (alpha = 0)",
    ),
    Method(
        name="pcpo-reweight",
        title="PCPO-reweight (diffusion, uw-sigma)",
        grid=grids.sd15_pcpo,
        table=TableRow(
            estimator="ZO",
            lookahead="full rollout",
            branching="$K=1$ (group of 16 per prompt)",
            temporal_weight=r"$\mathbb{1}$ ($w_t\to\hat w$)",
            trust_region=r"clip on $1+\log\rho$",
            c1="$0$",
            g=r"$\mathbb{1} A \hat w\,\epsilon/(2|\kappa| d)$",
            p=r"$\mathbb{1} A \hat w^2/(2\kappa^2 d)$",
        ),
        relation=Relation.EXACT,
        signal=Signal.STEIN,
        config=PCPODiffusionConfig(),
        loss=reweight_loss,
        coefficients=reweight_coefficients,
        needs=("noise", "advantage"),
        note="sampler std nu' from W = 4.5; loss weight w_bar = 4.5 / 8.70575 = 0.5169",
        # the published SD1.5 PCPO trainer (spec §3): 8 prompts x 16 trajectories per rank, 49 trained
        # transitions of each, 2 updates per epoch; the arm's defaults are its settings
        arm="zo_trajectory",
        kl=approx_kl,
        diagnostics=diagnostics,
    ),
    Method(
        name="pcpo-reweight-flow",
        title="PCPO-reweight (flow)",
        grid=grids.sd35_flow_grpo,
        table=TableRow(
            estimator="ZO",
            lookahead="full rollout",
            branching="$K=1$ (group of $G$ per prompt)",
            temporal_weight=r"$\mathbb{1}\, m_t$, $m_t=\zeta\Delta_t/w_t$",
            trust_region=r"clip on $\rho^{m_t}$ ($\times\rho$ per sample)",
            c1=r"$\alpha_t b^2/(2\nu^2 d)$",
            g=r"$\mathbb{1} m_t A b\,\epsilon/(2\nu d)$",
            p=r"$\mathbb{1} m_t A b^2/(2\nu^2 d)$",
        ),
        relation=Relation.RATIO_FACTOR,
        signal=Signal.STEIN,
        config=PCPOFlowConfig(),
        loss=flow_loss,
        coefficients=flow_coefficients,
        needs=("noise", "advantage", "f_ref"),
    ),
]
