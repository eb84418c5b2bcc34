"""TempFlow-GRPO's per-row objective (zo_flow_tempflow spec §8-9; theory spec §5.3, Eq. 113).

A row is one child of a branching rollout: the trunk state x_t, one Flow-GRPO SDE step, then ODE to
the end. The published "ppo" objective weights the clipped ratio surrogate by TempFlow's noise
weight 2.25 nu_t outside the clip; the "matching" objective puts that weight inside:
max(eps_c |A| + A 2.25 nu_t (T1 + T2), 0) with T1 + T2 = -log rho. Both rows and their KL to the
reference carry the branch-count weight k_avg / k_i, and rows with a zero advantage are masked
(policy and KL). Canonical (per child): G = 1 gamma A b eps/(2 nu d), P = 1 gamma A b^2/(2 nu^2 d),
C1 = alpha_t b^2/(2 nu^2 d), gamma = 2.25 nu_t, all times k_avg / k_i; the "ppo" form carries
sg(rho) on G and P.

The published trainer also offers GRPO-Guard's and PCPO's reweights (spec §8.1-8.2), trained here as
"tempflow-grpo-guard" and "tempflow-pcpo" on the same branching rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from baselines import pcpo
from baselines.common import (
    KLDenominator,
    clip_advantage,
    flow_step,
    kl_scale,
    kl_to_reference,
    mean_log_ratio,
    policy_gradient_coefficients,
)
from baselines.grpo_guard import centred_log_ratio
from baselines.method import Family, Method, Relation, Signal, TableRow
from rsm_core import grids
from rsm_core.config import require
from rsm_core.loss import Coefficients, Surrogate, fair_clip_scales, scaled_surrogate
from rsm_core.transitions import Transitions
from rsm_core.weighting import grpo_guard_weight

ObjectiveForm = Literal["ppo", "matching"]
# The reweight options of the published trainer (spec §8.1-8.2); Figure 3's redesigns use fair_clip,
# the GenEval redesign fair_clip2 (fair clipping with GRPO-Guard's temporal weight nu_t / delta_t).
Reweight = Literal["base", "tempflow", "fair_clip", "fair_clip2", "grpo_guard", "pcpo"]
FORMS = {"ppo": "ratio", "matching": "matching"}  # the trust region each objective clips with


@dataclass(frozen=True)
class TempFlowConfig:
    objective: ObjectiveForm = "ppo"
    reweight: Reweight = "tempflow"
    # Hard-coded in the published code; 1 / mean_t nu_t = 2.2522 over the 9 trained SD3.5 steps, so
    # the weights average to about one there.
    noise_weight_scale: float = 2.25
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    beta: float = 0.01  # Fig. 3 (aesthetic); 0.004 for GenEval
    kl_denominator: KLDenominator = "heuristic"  # Fig. 3; "exact" for GenEval

    def __post_init__(self) -> None:
        require(self.objective in FORMS, "objective", f"choose one of {list(FORMS)}")
        require(self.reweight in get_args(Reweight), "reweight", f"choose one of {list(get_args(Reweight))}")
        require(
            not (self.objective == "ppo" and self.reweight == "fair_clip2"),
            "reweight",
            "fair_clip2 exists only for objective 'matching' (as in the published code)",
        )
        require(self.kl_denominator in ("heuristic", "exact"), "kl_denominator", "heuristic or exact")
        require(self.clip_range > 0, "clip_range", "must be positive")
        require(self.adv_clip_max > 0, "adv_clip_max", "must be positive")
        require(self.beta >= 0, "beta", "must not be negative")


def noise_weight(rows: Transitions, config: TempFlowConfig) -> Tensor:
    """TempFlow's gamma_t = 2.25 nu_t."""
    return config.noise_weight_scale * rows.kernel.nu


def pcpo_weight(rows: Transitions) -> Tensor:
    """zeta delta_t: the kernel weight PCPO's reweight puts in place of w_t."""
    return pcpo.ZETA * flow_step(rows.kernel)


def clip_scale_and_weight(rows: Transitions, config: TempFlowConfig) -> tuple[Tensor, Tensor]:
    """(kappa_t, lambda_t): the clip acts on kappa_t log rho' and lambda_t multiplies the clipped term.

    Spec §8.1/8.2: tempflow puts 2.25 nu_t outside the clip for "ppo" and inside for "matching";
    fair clipping clips nu_t^2 log rho (a mean shift in latent units) and divides by nu_t^2 outside,
    times GRPO-Guard's nu_t / delta_t for fair_clip2. grpo_guard clips nu_t log rho' (rho' centred,
    see ``clipped_value``) and divides by delta_t; pcpo scales the exponent by zeta delta_t / w_t.
    For pcpo with "matching" kappa_t is the factor on log rho's linear term only (its quadratic term
    gets kappa_t^2, see ``clipped_value``).
    """
    one = torch.ones_like(rows.kernel.nu)
    nu = rows.kernel.nu
    if config.reweight == "base":
        return one, one
    if config.reweight == "tempflow":
        gamma = noise_weight(rows, config)
        return (one, gamma) if config.objective == "ppo" else (gamma, one)
    if config.reweight == "fair_clip":
        return fair_clip_scales(nu)
    if config.reweight == "grpo_guard":
        return nu, 1 / flow_step(rows.kernel)
    if config.reweight == "pcpo":
        return pcpo_weight(rows) / rows.kernel.w, one
    # fair_clip2 (matching only: the config refuses ppo with it)
    return fair_clip_scales(nu, grpo_guard_weight(nu, flow_step(rows.kernel)))


def clipped_value(f_theta: Tensor, rows: Transitions, config: TempFlowConfig) -> Tensor:
    """kappa_t log rho': the quantity the trust region acts on (-m of the "matching" objective).

    grpo_guard: nu_t (log rho + mean_d (mu_theta - mu_old)^2 / (2 nu_t^2)), GRPO-Guard's centred
    log-ratio, for both objectives; for "matching" the published -nu_t T2 is the same quantity.
    pcpo with "matching": the published T1 + T2 computed with the kernel weight zeta delta_t instead
    of w_t, i.e. 1/2 mean_d (zeta delta_t df)^2 + mean_d (zeta delta_t df eps) = kappa_t^2 T1 +
    kappa_t T2 (kappa_t = zeta delta_t / w_t) -- not kappa_t (T1 + T2) as on the "ppo" path.
    """
    if config.reweight == "grpo_guard":
        return centred_log_ratio(f_theta, rows)
    if config.reweight == "pcpo" and config.objective == "matching":
        return pcpo.weighted_log_ratio(f_theta, rows, pcpo_weight(rows))
    scale, _ = clip_scale_and_weight(rows, config)
    return scale * mean_log_ratio(f_theta, rows)


def row_weight(rows: Transitions) -> Tensor:
    """k_avg / k_i on rows with a non-zero advantage, 0 on masked rows."""
    return rows.branch_weight * (rows.advantage != 0)


def _policy(f_theta: Tensor, rows: Transitions, config: TempFlowConfig) -> tuple[Surrogate, Tensor]:
    """The clipped policy term and the log-ratio its trust region acts on (kappa_t log rho')."""
    _, weight = clip_scale_and_weight(rows, config)
    value = clipped_value(f_theta, rows, config)
    adv = clip_advantage(rows, config.adv_clip_max)
    policy = scaled_surrogate(value, adv, config.clip_range, form=FORMS[config.objective], weight=weight)
    return policy, value


def kl(f_theta: Tensor, rows: Transitions, config: TempFlowConfig) -> Tensor:
    """The per-row KL to the reference with the configured denominator (spec §9)."""
    return kl_to_reference(f_theta, rows, config.kl_denominator)


def loss(f_theta: Tensor, rows: Transitions, config: TempFlowConfig) -> Surrogate:
    rows.require("noise", "advantage", "f_ref", "branch_weight", method="TempFlow-GRPO")
    policy, _ = _policy(f_theta, rows, config)
    return Surrogate(
        row_weight(rows) * (policy.loss + config.beta * kl(f_theta, rows, config)), policy.active
    )


def diagnostics(
    f_theta: Tensor, rows: Transitions, config: TempFlowConfig, surrogate: Surrogate
) -> dict[str, Tensor]:
    """Per-row statistics as the published trainer logs them (spec §8.4), plus ours:

    - ``clipfrac``: ppo |rho - 1| > eps_c with rho = exp(kappa log rho'); matching eps_c |A| + A m < 0
      (m = -kappa log rho', ``clipped_value``: GRPO-Guard's centred and PCPO's reweighted forms too);
    - ``clip_zeroed_frac``: rows whose policy gradient the trust region zeroes (our own measure);
    - ``approx_kl``: 0.5 (kappa log rho')^2; ``kl_loss``: the KL term with the row's k_avg / k_i.
    """
    _, log_ratio = _policy(f_theta, rows, config)
    if config.objective == "ppo":
        clipped = (torch.exp(log_ratio) - 1).abs() > config.clip_range
    else:
        adv = clip_advantage(rows, config.adv_clip_max)
        clipped = config.clip_range * adv.abs() - adv * log_ratio < 0
    return {
        "clipfrac": clipped.double(),
        "clip_zeroed_frac": (~surrogate.active).double(),
        "approx_kl": 0.5 * log_ratio**2,
        "kl_loss": kl(f_theta, rows, config) * rows.branch_weight,
    }


def coefficients(f_theta: Tensor, rows: Transitions, config: TempFlowConfig, active: Tensor) -> Coefficients:
    """The RSM reduction: kappa_t log rho' is linear in df for grpo_guard (P = 0, the centring drops
    the old-policy anchor) and is the log-ratio of a kernel of weight zeta delta_t for pcpo matching."""
    kernel = rows.kernel
    scale, weight = clip_scale_and_weight(rows, config)
    adv = clip_advantage(rows, config.adv_clip_max)
    alpha = row_weight(rows) * config.beta * kl_scale(kernel, config.kl_denominator)
    if config.reweight == "pcpo" and config.objective == "matching":
        policy = row_weight(rows) * active * adv * weight
        # G and P of the zeta delta_t kernel the clip acts on; C1 of the KL, which keeps w_t
        own = policy_gradient_coefficients(pcpo_weight(rows), rows.noise, policy, 0.0, rows.elements)
        kl_part = policy_gradient_coefficients(
            kernel.w, rows.noise, torch.zeros_like(policy), alpha, rows.elements
        )
        return Coefficients(kl_part.c1, own.g, own.p)
    policy = row_weight(rows) * active * adv * scale * weight
    if config.objective == "ppo":
        policy = policy * torch.exp(clipped_value(f_theta, rows, config)).detach()
    anchor = config.reweight != "grpo_guard"
    return policy_gradient_coefficients(kernel.w, rows.noise, policy, alpha, rows.elements, anchor=anchor)


_ROW = dict(
    estimator="ZO",
    lookahead="one SDE step, then ODE (localised)",
    branching="$K_t=6$ at each of 9 steps",
    temporal_weight=r"$\mathbb{1}\cdot 2.25\,\nu_t$",
    c1=r"$\alpha_t b^2/(2\nu^2 d)$",
    g=r"$\mathbb{1}\gamma A b\,\epsilon/(2\nu d)$ per child",
    p=r"$\mathbb{1}\gamma A b^2/(2\nu^2 d)$ ($\Sigma\approx 0$ over a centred group)",
)
# What every method on the branching arm shares: its grid, its signal and its per-row pieces.
_BRANCHING = dict(
    grid=grids.sd35_flow_grpo,
    signal=Signal.STEIN,
    loss=loss,
    coefficients=coefficients,
    kl=kl,
    diagnostics=diagnostics,
    needs=("noise", "advantage", "f_ref", "branch_weight"),
    arm="zo_branch",
)
_REDESIGN = dict(family=Family.REDESIGN, **_BRANCHING)  # the paper's redesigns: no row of Table 1
_FAIR_CLIP = TempFlowConfig(reweight="fair_clip")  # the baseline's loss family (ppo), fair clipping

METHODS = [
    Method(
        name="tempflow-grpo",
        title="TempFlow-GRPO (ppo)",
        table=TableRow(trust_region=r"clip on $\rho$ ($\times\rho$ per sample)", **_ROW),
        relation=Relation.RATIO_FACTOR,
        config=TempFlowConfig(),
        arm_config={"profile": "base"},
        note="alpha_t = beta delta_t (heuristic KL denominator); rows weighted by k_avg / k_i",
        **_BRANCHING,
    ),
    Method(
        name="tempflow-grpo-matching",
        title="TempFlow-GRPO (matching)",
        table=TableRow(trust_region=r"clip on $\gamma_t\log\rho$", **_ROW),
        relation=Relation.EXACT,
        config=TempFlowConfig(objective="matching"),
        arm_config={"profile": "base"},
        **_BRANCHING,
    ),
    # The published trainer's other reweight options (spec §8.1 "guard" and "pcpo"), with its default
    # loss family (ppo) and profile: baselines without a row of Table 1 of their own.
    Method(
        name="tempflow-grpo-guard",
        title="TempFlow-GRPO, GRPO-Guard reweight (ppo)",
        relation=Relation.RATIO_FACTOR,
        config=TempFlowConfig(reweight="grpo_guard"),
        arm_config={"profile": "base"},
        note="the published TempFlow-GRPO trainer's 'guard' reweight option: the clip acts on nu_t "
        "times the centred log-ratio, the clipped term is divided by delta_t",
        **_BRANCHING,
    ),
    Method(
        name="tempflow-pcpo",
        title="TempFlow-GRPO, PCPO reweight (ppo)",
        relation=Relation.RATIO_FACTOR,
        config=TempFlowConfig(reweight="pcpo"),
        arm_config={"profile": "base"},
        note="the published TempFlow-GRPO trainer's 'pcpo' reweight option: the ratio's exponent is "
        f"scaled by zeta delta_t / w_t (zeta = {pcpo.ZETA})",
        **_BRANCHING,
    ),
    # The paper's redesigns of zeroth-order flow matching (spec §14), configurations of the same parts.
    # Figure 3, step 1: fair clipping alone (the clip acts on nu_t^2 log rho, the rescaling is undone
    # outside it), with the baseline's profile and loss family.
    Method(
        name="fair-clip",
        title="Fair clipping (base profile)",
        relation=Relation.RATIO_FACTOR,
        config=_FAIR_CLIP,
        arm_config={"profile": "base"},
        **_REDESIGN,
    ),
    # Steps 2 and 3: the branching budget reallocated, towards high SNR and with step 8 switched off
    # (the baseline's loss family, ppo, as the spec recommends).
    Method(
        name="uniform-reallocation",
        title="Uniform Reallocation (fair clip, base2)",
        relation=Relation.RATIO_FACTOR,
        config=_FAIR_CLIP,
        arm_config={"profile": "base2"},
        **_REDESIGN,
    ),
    Method(
        name="equal-variance-reallocation",
        title="Equal Variance Reallocation (fair clip, highsnr2)",
        relation=Relation.RATIO_FACTOR,
        config=_FAIR_CLIP,
        arm_config={"profile": "highsnr2"},
        **_REDESIGN,
    ),
    # The GenEval validation (the published command): low-SNR branching, the matching loss with fair
    # clipping and GRPO-Guard's temporal weight, ODE-anchor KL rows, the GenEval preset's KL.
    Method(
        name="lowsnr2-matching-fairclip2",
        title="lowsnr2 + matching + fair clip2",
        relation=Relation.EXACT,
        config=TempFlowConfig(
            objective="matching", reweight="fair_clip2", beta=0.004, kl_denominator="exact"
        ),
        arm_config={"profile": "lowsnr2", "ode_anchors": True},
        **_REDESIGN,
    ),
]
