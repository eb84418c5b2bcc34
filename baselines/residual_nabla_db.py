"""Residual nabla-DB (fo_first_order spec §A; theory spec §5.3, Eq. 68-78).

The pruned algorithm (what the RSM configs run): per transition x_t -> x_t',

    L_F  = mean_d (s_theta - s_ref - R k_t g)^2,   s_theta = l_theta (mu_theta - x_t') / nu^2,
                                                    s_ref   = l_t (mu_ref - x_t') / nu^2,
    L_TR = unet_reg_scale mean_d (eps_theta - eps_old)^2,

with g the rows' detached reward gradient, l_t the strength (1 for the baseline, sigma~_t for the
redesign), l_theta = l_t in the RSM trainer and 1 in the original nabla-GFN, and k_t the reward
factor (abar_t' for 'squared', sigma~_t for 'sigma'). Canonical, exact for every combination:
C1 = l_theta^2 b^2/(d nu^4), G = l_theta b [R k_t g + (l_t - l_theta)(mu_ref - x_t')/nu^2]/(d nu^2),
P = unet_reg_scale/(d kappa^2): with l_theta != l_t the reference score keeps a theta-free part in
the target, a per-sample constant like the reward term.

The unpruned algorithm (``unpruned_loss``; registered as ``residual-nabla-db-unpruned``) adds the
residual network g_phi to the forward target, a backward loss L_B on input-Jacobian scores and a
terminal loss on g_phi. Their effect on theta: L_B and the terminal loss carry no gradient to theta,
and g_phi enters only as extra guidance in G (the registered reduction folds it in; the pruned one
drops it: the paper finds g_phi collapses to ~0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
from torch import Tensor

from baselines.common import logged_surrogate, row_norm, terminal_rows_mean
from baselines.method import Family, Method, Relation, Signal, TableRow
from rsm_core import grids
from rsm_core.config import require
from rsm_core.flows import per_sample
from rsm_core.kernels import reduce_per_sample
from rsm_core.loss import Coefficients, Surrogate
from rsm_core.transitions import Transitions
from rsm_core.weighting import gapped_ddpm_std

NativeAt = Callable[[Tensor], Tensor]  # a network evaluated at the rows' own time: x -> native output
# reward_adaptive_mode: abar_t' ('squared', t' = t - 20 clamped) or sigma~_t ('sigma', the redesign)
RewardMode = Literal["squared", "sigma"]
# Which strength multiplies the policy's forward score: l_t as the RSM trainer does (spec §A.3), or 1
# as the original nabla-GFN does, which applies l_t to the reference score only (spec §A.6).
PolicyStrength = Literal["lambda", "one"]


@dataclass(frozen=True)
class NablaDBConfig:
    reward_scale: float = 5e5  # R of the RSM pruned-baseline config (1e4 in the original HPS config)
    # l_t (``pretrained_strength``): a constant, or 'sigma' = sigma~_t (the redesign, spec §A.3)
    pretrained_strength: float | Literal["sigma"] = 1.0
    reward_adaptive_mode: RewardMode = "squared"
    # sigma~_t steps back this many DDPM indices: the published trainer's off-by-one t - 1000 // 51
    # (spec §A.3 note, E.14); 20 would be the kernel's own gap, making sigma~_t = nu_t.
    sigma_gap: int = 19
    policy_score_strength: PolicyStrength = "lambda"
    unet_reg_scale: float = 1e2
    reverse_loss_scale: float = 1.0  # unpruned only
    terminal_loss_scale: float = 1.0  # unpruned only
    # unpruned only: the rows of the published microbatch the terminal loss averages over (the RSM
    # trainer's one trajectory per micro-step, one transition per forward: 1 row)
    terminal_group_rows: int = 1

    def __post_init__(self) -> None:
        value = self.pretrained_strength
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(numeric or value == "sigma", "pretrained_strength", "a number or 'sigma'")
        for key, options in (
            ("reward_adaptive_mode", RewardMode),
            ("policy_score_strength", PolicyStrength),
        ):
            require(getattr(self, key) in get_args(options), key, f"choose one of {list(get_args(options))}")
        require(self.sigma_gap >= 1, "sigma_gap", "must be a positive number of DDPM indices")
        require(self.terminal_group_rows >= 1, "terminal_group_rows", "must be at least 1")


# The published configurations (fo_first_order spec §A.3, A.6): the pruned baseline
# (simple_res-nabladb_sd_hps.yaml), the RSM redesign (..._usez0_basesnr.yaml; its lr 4e-3 and epoch
# count are trainer settings) and the unpruned original's loss settings on the baseline config.
PAPER = NablaDBConfig(
    reward_scale=5e5,
    pretrained_strength=1.0,
    reward_adaptive_mode="squared",
    sigma_gap=19,
    policy_score_strength="lambda",
    unet_reg_scale=1e2,
)
# The redesign's loss; its arm also swaps the lookahead gradient for the terminal one (``use_z0``,
# spec §A.3), and the Fig. 6(c,d) ablation keeps this loss with the lookahead estimator.
REDESIGN = replace(PAPER, pretrained_strength="sigma", reward_adaptive_mode="sigma")
UNPRUNED = replace(
    PAPER,
    policy_score_strength="one",
    reverse_loss_scale=1.0,
    terminal_loss_scale=1.0,
    terminal_group_rows=1,
)


def sigma_tilde(rows: Transitions, config: NablaDBConfig) -> Tensor:
    """sigma~_t of the redesign: the DDPM std over the trainer's gap (see ``gapped_ddpm_std``)."""
    return gapped_ddpm_std(rows.kernel.point.alpha**2, config.sigma_gap)


def strength(rows: Transitions, config: NablaDBConfig) -> Tensor:
    """l_t, the strength of the reference score (and of the backward scores)."""
    if config.pretrained_strength == "sigma":
        return sigma_tilde(rows, config)
    return torch.full_like(rows.kernel.nu, float(config.pretrained_strength))


def policy_strength(rows: Transitions, config: NablaDBConfig) -> Tensor:
    """l_theta, the strength of the policy's forward score (see PolicyStrength)."""
    if config.policy_score_strength == "one":
        return torch.ones_like(rows.kernel.nu)
    return strength(rows, config)


def reward_factor(rows: Transitions, config: NablaDBConfig) -> Tensor:
    """k_t: abar at t' (the DDPM grid's t - 20, clamped to abar_0) or sigma~_t."""
    if config.reward_adaptive_mode == "sigma":
        return sigma_tilde(rows, config)
    return rows.kernel.prev.alpha**2


def _score(mean: Tensor, x_next: Tensor, rows: Transitions, scale: Tensor) -> Tensor:
    """The code's "score" of a model's kernel mean at strength ``scale``: scale (mu - x_t') / nu^2."""
    return per_sample(scale / rows.kernel.nu**2, mean) * (mean - x_next)


def _reward_target(rows: Transitions, config: NablaDBConfig) -> Tensor:
    return per_sample(config.reward_scale * reward_factor(rows, config), rows.reward_grad) * rows.reward_grad


def _forward_and_trust_region(
    f_theta: Tensor, rows: Transitions, config: NablaDBConfig, extra_target: Tensor | None
) -> tuple[Tensor, Tensor]:
    x_next = rows.x_next.detach()
    s_theta = _score(rows.kernel.mean(rows.x, f_theta), x_next, rows, policy_strength(rows, config))
    s_ref = _score(rows.kernel.mean(rows.x, rows.f_ref), x_next, rows, strength(rows, config)).detach()
    target = s_ref + _reward_target(rows, config)
    if extra_target is not None:
        target = target + extra_target
    forward = reduce_per_sample((s_theta - target) ** 2, "mean")
    trust_region = config.unet_reg_scale * reduce_per_sample((f_theta - rows.f_old.detach()) ** 2, "mean")
    return forward, trust_region


def loss(f_theta: Tensor, rows: Transitions, config: NablaDBConfig) -> Surrogate:
    rows.require("f_ref", "reward_grad", method="Residual nabla-DB")
    forward, trust_region = _forward_and_trust_region(f_theta, rows, config, extra_target=None)
    total = forward + trust_region
    return Surrogate(total, torch.ones_like(total, dtype=torch.bool))


def coefficients(
    f_theta: Tensor, rows: Transitions, config: NablaDBConfig, active: Tensor, residual: Tensor | None = None
) -> Coefficients:
    """Exact reduction for every config; ``residual`` = g_phi(x_t') folds the unpruned target's
    residual into G."""
    kernel, d = rows.kernel, rows.elements
    own, ref = policy_strength(rows, config), strength(rows, config)
    # The target minus the policy's score of mu_ref: theta-free, so it enters G only.
    offset = _reward_target(rows, config)
    offset = offset + _score(kernel.mean(rows.x, rows.f_ref), rows.x_next, rows, ref - own)
    if residual is not None:
        offset = offset + residual.detach()
    c1 = own**2 * kernel.w**2 / (d * kernel.nu**2)
    g = -per_sample(own * kernel.w / (d * kernel.nu), offset) * offset
    p = torch.full_like(c1, config.unet_reg_scale / d)
    return Coefficients(c1, g, p)


# --- the unpruned algorithm ---------------------------------------------------------------------


@dataclass(frozen=True)
class UnprunedTerms:
    forward: Tensor  # (B,) L_F with g_phi(x_t') in the (non-detached) target
    backward: Tensor  # (B,) L_B
    terminal: Tensor  # (B,) g_phi(x_0)^2 terms whose batch mean is the published L_T (terminal_rows_mean)
    trust_region: Tensor  # (B,)
    residual_norm: Tensor  # (B,) ||g_phi(x_t', t')||
    reward_norm: Tensor  # (B,) ||R k_t g||, the reward term g_phi corrects (their ratio: Fig. 8)

    def total(self, config: NablaDBConfig) -> Tensor:
        return (
            self.forward
            + config.reverse_loss_scale * self.backward
            + config.terminal_loss_scale * self.terminal
            + self.trust_region
        )


def _input_score(native_at: NativeAt, rows: Transitions, x_next: Tensor, config: NablaDBConfig) -> Tensor:
    """l_t grad_{x_t} [-||x_t' - mu(x_t)||^2 / (2 nu^2)], by autograd without a higher-order graph
    (create_graph=False, as released), so it is a constant for every parameter."""
    with torch.enable_grad():
        x = rows.x.detach().requires_grad_(True)
        mean = rows.kernel.mean(x, native_at(x))
        log_density = -reduce_per_sample((x_next - mean) ** 2, "sum") / (2 * rows.kernel.nu**2)
        (grad,) = torch.autograd.grad(log_density.sum(), x)
    return per_sample(strength(rows, config), grad) * grad


def unpruned_loss(
    f_theta: Tensor,
    rows: Transitions,
    config: NablaDBConfig,
    *,
    policy_at: NativeAt,
    reference_at: NativeAt,
    residual_now: Tensor,
    residual_next: Tensor,
    reward_grad_now: Tensor,
    terminal: Tensor,
) -> UnprunedTerms:
    """The original nabla-GFN loss (fo_first_order spec §A.6; use ``UNPRUNED``) on rows that carry
    the lookahead reward gradient at x_t' (``reward_grad``); ``residual_now``/``residual_next`` are
    g_phi(x_t, t) and g_phi(x_t', t') with their graph to phi, ``reward_grad_now`` =
    grad_{x_t} r(decode(x0_hat_theta(x_t))) and ``terminal`` marks the last transition (t = 1 -> x_0)."""
    rows.require("f_ref", "reward_grad", method="Residual nabla-DB (unpruned)")
    # The original weights L_B's reward gradient by abar_t only in its 'squared' mode, which has no
    # counterpart of the redesign's 'sigma'.
    require(
        config.reward_adaptive_mode == "squared", "reward_adaptive_mode", "'squared' in the unpruned loss"
    )
    live = per_sample((~terminal).to(f_theta.dtype), residual_next)
    # Terminal transitions drop g_phi from the forward target (and the target is detached there).
    forward, trust_region = _forward_and_trust_region(
        f_theta, rows, config, extra_target=live * residual_next
    )

    x_next = rows.x_next.detach()
    b_theta = _input_score(policy_at, rows, x_next, config)
    b_ref = _input_score(reference_at, rows, x_next, config)
    alpha_now = per_sample(config.reward_scale * rows.kernel.point.alpha**2, reward_grad_now)
    backward_target = live * (b_ref - residual_now - alpha_now * reward_grad_now.detach())
    backward = reduce_per_sample((b_theta - backward_target) ** 2, "mean")

    terminal_loss = terminal_rows_mean(
        reduce_per_sample(residual_next**2, "mean"), terminal, config.terminal_group_rows
    )
    return UnprunedTerms(
        forward,
        backward,
        terminal_loss,
        trust_region,
        row_norm(residual_next),
        row_norm(_reward_target(rows, config)),
    )


_NETWORKS = (
    "policy_field",
    "reference_field",
    "aux_field",
    "sample_reward",
    "time",
    "time_next",
    "steps_remaining",
)


def current_reward_gradient(rows: Transitions) -> Tensor:
    """grad_{x_t} r(decode(x0_hat_theta(x_t))) through the current policy (the backward target's)."""
    with torch.enable_grad():
        x = rows.x.detach().requires_grad_(True)
        x0_hat = rows.kernel.point.x0(x, rows.policy_field(x, rows.time))
        (grad,) = torch.autograd.grad(rows.sample_reward(x0_hat).sum(), x)
    return grad.detach()


def _residual_next(rows: Transitions) -> Tensor:
    return rows.aux_field(rows.x_next.detach(), rows.time_next)


def unpruned(f_theta: Tensor, rows: Transitions, config: NablaDBConfig) -> Surrogate:
    """The registered unpruned loss: g_phi is the rows' ``aux_field``; the last transition (t = 1 ->
    x_0) is the terminal one."""
    rows.require(*_NETWORKS, method="Residual nabla-DB (unpruned)")
    terms = unpruned_loss(
        f_theta,
        rows,
        config,
        policy_at=lambda x: rows.policy_field(x, rows.time),
        reference_at=lambda x: rows.reference_field(x, rows.time),
        residual_now=rows.aux_field(rows.x.detach(), rows.time),
        residual_next=_residual_next(rows),
        reward_grad_now=current_reward_gradient(rows),
        terminal=rows.steps_remaining == 0,
    )
    return logged_surrogate(
        terms.total(config),
        {
            "loss_forward": terms.forward,
            "loss_backward": terms.backward,
            "loss_terminal": terms.terminal,
            "loss_trust_region": terms.trust_region,
            "aux_norm": terms.residual_norm,
            "aux_signal_norm": terms.reward_norm,
        },
    )


def unpruned_coefficients(
    f_theta: Tensor, rows: Transitions, config: NablaDBConfig, active: Tensor
) -> Coefficients:
    """The reduction of ``unpruned``: g_phi(x_t', t') folded into G on every transition but the last."""
    live = per_sample((rows.steps_remaining != 0).to(rows.x.dtype), rows.x)
    return coefficients(f_theta, rows, config, active, residual=live * _residual_next(rows))


# The published trainer's arm settings (spec §A.1-A.4): 64 trajectories per rank in batches of 8,
# 50-step DDIM with eta = 1 and CFG 5 (gradients through both halves), 11 low-variance transitions per
# trajectory, one trajectory (11 rows) per microbatch.
_ARM = {
    "sampler": "ddpm",
    "sampler_steps": 50,
    "cfg": 5.0,
    "cfg_grad": "both",
    "trajectories_per_epoch": 64,
    "collection_batch": 8,
    "transitions": "low_variance",
    "timestep_fraction": 0.2,
    "estimator": "lookahead",
    "microbatch_rows": 11,
}
_TRAINING = dict(
    grid=grids.sd15_ddpm,
    relation=Relation.EXACT,
    signal=Signal.REWARD_GRADIENT,
    loss=loss,
    coefficients=coefficients,
    needs=("f_ref", "reward_grad", "noise"),
    arm="fo_trajectory",
)

METHOD = Method(
    name="residual-nabla-db",
    title=r"Residual $\nabla$-DB (pruned)",
    table=TableRow(
        estimator="FO",
        lookahead="$k=1$ (full Jacobian)",
        branching="$K=1$",
        temporal_weight=r"$\bar\alpha_{t'}$",
        trust_region=r"quadratic anchor $\lambda_{reg}$",
        c1=r"$s_k^2 b^2/(d\nu^4)$",
        g=r"$s_k b R\bar\alpha_{t'}\hat g/(d\nu^2)$",
        p=r"$\lambda_{reg}/(d\kappa^2)$",
    ),
    config=PAPER,
    arm_config=_ARM,
    note="pruned: residual net, backward and terminal losses removed; see unpruned_loss",
    **_TRAINING,
)

# The original algorithm in the RSM setting (spec §A.6, last item): the baseline's config plus g_phi,
# L_B and L_T with the original's defaults (g_phi lr 1e-3, decay 1e-2, clip 1; reverse and terminal
# scales 1); policy score at strength 1 as nabla-GFN computes it.
UNPRUNED_METHOD = Method(
    name="residual-nabla-db-unpruned",
    title=r"Residual $\nabla$-DB (unpruned)",
    config=UNPRUNED,
    arm_config={**_ARM, "auxiliary": "residual_unet", "aux_lr": 1e-3, "aux_weight_decay": 1e-2},
    note="the original algorithm: residual network g_phi with its backward and terminal losses",
    **{
        **_TRAINING,
        "loss": unpruned,
        "coefficients": unpruned_coefficients,
        "needs": ("f_ref", "reward_grad", "noise", *_NETWORKS),
    },
)

# The paper's redesign of the diffusion family (spec §A.3 OURS: sigma~ strength and reward factor,
# the terminal-image gradient) and its Figure 6(c, d) ablation, which keeps the lookahead estimator
# under the redesign's weighting. The redesign's published lr is 4e-3 (the baseline's 1e-3): a loop
# setting, in the figure configs.
METHODS = (
    METHOD,
    UNPRUNED_METHOD,
    Method(
        name="reward-score-distillation-diffusion",
        title="Reward score distillation (diffusion)",
        family=Family.REDESIGN,
        config=REDESIGN,
        arm_config={**_ARM, "estimator": "terminal"},
        note="terminal-image reward gradient with the sigma~ strength and reward factor",
        **_TRAINING,
    ),
    Method(
        name="nabla-db-estimator-ablation",
        title="Tweedie lookahead under the redesign's weighting",
        family=Family.REDESIGN,
        config=REDESIGN,
        arm_config=_ARM,
        note="the redesign's weighting with the baseline's lookahead estimator (Figure 6(c, d))",
        **_TRAINING,
    ),
)
