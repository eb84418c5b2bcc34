"""VGG-Flow (fo_first_order spec §B; theory spec §5.3, Eq. 84-88).

Pruned (the RSM baseline): velocity matching on the Euler-ODE grid,

    L = mean_d (v_theta - sg[v_ref - lambda eta(t) clip_tau(g)])^2  (+ unet_reg mean_d (v_theta - v_old)^2),

with g = grad_x r(decode(x - t sg(v_theta))) (current-state Tweedie, identity Jacobian) clipped per
sample as published, g / (||g|| + 1e-8) min(||g||, tau). Canonical: C1 = 1/(d kappa^2),
G = lambda eta g/(d |kappa|), P = unet_reg/(d kappa^2). The RSM redesign (``REDESIGN``) changes only
the schedule, and which reward gradient the arm puts in the rows, so it shares this loss.

Unpruned (``unpruned_loss``; registered as ``vgg-flow-unpruned``): the target adds the value network
g_psi, and a finite-difference consistency loss and a terminal loss train g_psi. Every reward gradient
and direction inside them is detached, so they carry no gradient to theta; g_psi reaches theta only
as extra guidance in G (the registered reduction folds it in; the pruned one drops it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import get_args

import torch
from torch import Tensor

from baselines.common import logged_surrogate, row_norm, terminal_rows_mean
from baselines.method import Family, Method, Relation, Signal, TableRow
from rsm_core import grids
from rsm_core.config import require
from rsm_core.flows import per_sample
from rsm_core.interfaces import SampleReward
from rsm_core.kernels import reduce_per_sample
from rsm_core.loss import Coefficients, Surrogate
from rsm_core.transitions import FieldFn, Transitions
from rsm_core.weighting import EtaMode, vgg_flow_eta

# The guard of the published per-sample clip g / (||g|| + 1e-8) min(||g||, tau) (vggflow train_vggflow.py).
CLIP_EPS = 1e-8


@dataclass(frozen=True)
class VGGFlowConfig:
    reward_scale: float = 3e7  # lambda of the RSM pruned baseline (VGG-Flow's own default 1e3)
    eta_mode: EtaMode = "quad"
    # Quantile clipping: tau is reset to 1 each epoch and updated only after an optimizer step, so
    # with the RSM configs' one update per epoch tau = 1 throughout.
    clip_threshold: float = 1.0
    unet_reg_scale: float = 0.0
    coeff_terminal: float = 1000.0  # unpruned only
    # unpruned only: the rows of the published microbatch the terminal loss averages over (the
    # unpruned config's training.batch_size = 1 trajectory, one step per forward: 1 row)
    terminal_group_rows: int = 1
    fd_eps: float = 1e-4  # unpruned only: eps_t (in timestep units, t = 1000 sigma) and eps_x

    def __post_init__(self) -> None:
        require(self.eta_mode in get_args(EtaMode), "eta_mode", f"choose one of {list(get_args(EtaMode))}")
        require(self.clip_threshold > 0, "clip_threshold", "must be positive")
        require(self.terminal_group_rows >= 1, "terminal_group_rows", "must be at least 1")


# The published configurations (fo_first_order spec §B.3): the pruned baseline (hpsv2_geneval.py),
# the RSM redesign (hpsv2_geneval_ours.py: terminal estimator, "scaled linear" schedule) and the
# Fig. 6(a,b) ablations that keep the baseline estimator with the linear schedule at either scale.
PAPER = VGGFlowConfig(
    reward_scale=3e7,
    eta_mode="quad",
    clip_threshold=1.0,
    unet_reg_scale=0.0,
    coeff_terminal=1000.0,
    fd_eps=1e-4,
    terminal_group_rows=1,
)
# the redesign also swaps the estimator: its arm puts the terminal gradient in the rows (the
# registry entry's arm_config, ``training.use_saved_rgrad_x1``)
REDESIGN = replace(PAPER, reward_scale=1.5e7, eta_mode="linear")
LINEAR_A = replace(PAPER, eta_mode="linear")
LINEAR_B = replace(PAPER, eta_mode="linear", reward_scale=1.5e7)


def clip_norm(grad: Tensor, threshold: float) -> Tensor:
    """The published per-sample clip g / (||g|| + 1e-8) min(||g||, tau), ||.|| over all non-batch dims.

    Not g min(1, tau / ||g||): the 1e-8 guard also shrinks small gradients (by 1 % at ||g|| = 1e-6).
    """
    norm = per_sample(reduce_per_sample(grad**2, "sum").sqrt(), grad)
    return grad / (norm + CLIP_EPS) * norm.clamp(max=threshold)


def _guidance(rows: Transitions, config: VGGFlowConfig) -> Tensor:
    """lambda eta(t) clip(g): the velocity shift that the target subtracts from v_ref."""
    eta = vgg_flow_eta(rows.kernel.point.sigma, config.eta_mode)
    clipped = clip_norm(rows.reward_grad, config.clip_threshold)
    return per_sample(config.reward_scale * eta, clipped) * clipped


def _velocity_loss(f_theta: Tensor, rows: Transitions, config: VGGFlowConfig, value: Tensor | None) -> Tensor:
    target = rows.f_ref - _guidance(rows, config)
    if value is not None:
        target = target + value
    matching = reduce_per_sample((f_theta - target.detach()) ** 2, "mean")
    anchor = config.unet_reg_scale * reduce_per_sample((f_theta - rows.f_old.detach()) ** 2, "mean")
    return matching + anchor


def loss(f_theta: Tensor, rows: Transitions, config: VGGFlowConfig) -> Surrogate:
    rows.require("f_ref", "reward_grad", method="VGG-Flow")
    per_sample_loss = _velocity_loss(f_theta, rows, config, value=None)
    return Surrogate(per_sample_loss, torch.ones_like(per_sample_loss, dtype=torch.bool))


def coefficients(
    f_theta: Tensor, rows: Transitions, config: VGGFlowConfig, active: Tensor, value: Tensor | None = None
) -> Coefficients:
    """Pruned reduction; ``value`` = g_psi(x_t, t) folds the unpruned target's value net into G."""
    d = rows.elements
    shift = _guidance(rows, config)
    if value is not None:
        shift = shift - value.detach()
    c1 = torch.full((rows.x.shape[0],), 1.0 / d, dtype=rows.x.dtype)
    return Coefficients(c1, -shift / d, torch.full_like(c1, config.unet_reg_scale / d))


# --- the unpruned algorithm ---------------------------------------------------------------------


@dataclass(frozen=True)
class UnprunedTerms:
    velocity: Tensor  # (B,)
    consistency: Tensor  # (B,)
    terminal: Tensor  # (B,) batch mean = the published mean over terminal rows, see terminal_rows_mean
    value_norm: Tensor  # (B,) ||g_psi(x_t, t)||
    guidance_norm: Tensor  # (B,) ||S eta clip(G)||, the reward term g_psi corrects (their ratio: Fig. 8)

    def total(self, config: VGGFlowConfig) -> Tensor:
        return self.velocity + self.consistency + config.coeff_terminal * self.terminal


def _reward_grad(
    reward: SampleReward,
    x_explicit: Tensor,
    velocity_input: Tensor,
    policy: FieldFn,
    t: Tensor,
    wrt: str,
    tau: float,
) -> Tensor:
    """grad of r(x_explicit - t v_theta(velocity_input, t)), detached and norm-clipped.

    wrt="velocity": with respect to the network input only (the explicit x is another tensor);
    wrt="full": x_explicit and velocity_input are one differentiated point (full Tweedie Jacobian).
    """
    with torch.enable_grad():
        point = velocity_input.detach().requires_grad_(True)
        explicit = point if wrt == "full" else x_explicit.detach()
        x0_hat = explicit - per_sample(t, point) * policy(point, t)
        (grad,) = torch.autograd.grad(reward(x0_hat).sum(), point)
    return clip_norm(grad, tau).detach()


def unpruned_loss(
    f_theta: Tensor,
    rows: Transitions,
    config: VGGFlowConfig,
    *,
    policy: FieldFn,
    reference: FieldFn,
    value: FieldFn,
    reward: SampleReward,
    terminal: Tensor,
) -> UnprunedTerms:
    """The value-network VGG-Flow (fo_first_order spec §B.5) on rows that carry the current-state
    reward gradient (``reward_grad``); ``terminal`` marks rows at the last sampling time."""
    rows.require("f_ref", "reward_grad", method="VGG-Flow (unpruned)")
    x, t, scale, tau = rows.x.detach(), rows.kernel.point.sigma, config.reward_scale, config.clip_threshold
    eta_mode, eps = config.eta_mode, config.fd_eps
    value_now = value(x, t)
    velocity = _velocity_loss(f_theta, rows, config, value=value_now)

    def value_estimate(g_psi: Tensor, time: Tensor, grad: Tensor) -> Tensor:
        """V_hat = g_psi / S - eta(t) G."""
        return g_psi / scale - per_sample(vgg_flow_eta(time, eta_mode), grad) * grad

    clipped = clip_norm(rows.reward_grad, tau)
    v_hat = value_estimate(value_now, t, clipped)
    t_back = t - eps / 1000  # eps_t is in timestep units, t = 1000 sigma
    grad_back = _reward_grad(reward, x, x, policy, t_back, "velocity", tau)
    time_diff = (value_estimate(value(x, t_back), t_back, grad_back) - v_hat) / eps
    v_ref = rows.f_ref.detach()  # the reference at (x, t): the rows carry it
    fd_reference = (reference(x + eps * v_hat, t) - v_ref) / eps
    direction = (v_ref / scale + v_hat).detach()
    moved = x + eps * direction
    grad_moved = _reward_grad(reward, moved, moved, policy, t, "full", tau)
    eta = per_sample(vgg_flow_eta(t, eta_mode), x)
    fd_value = ((value(moved, t) - scale * eta * grad_moved) - scale * v_hat) / eps
    consistency = reduce_per_sample(((time_diff - fd_reference - fd_value) / scale) ** 2, "mean")
    terminal_loss = terminal_rows_mean(
        reduce_per_sample(value_now**2, "mean"), terminal, config.terminal_group_rows
    )
    return UnprunedTerms(
        velocity, consistency, terminal_loss, row_norm(value_now), row_norm(_guidance(rows, config))
    )


_NETWORKS = ("policy_field", "reference_field", "aux_field", "sample_reward", "steps_remaining")


def _unpruned_terms(f_theta: Tensor, rows: Transitions, config: VGGFlowConfig) -> UnprunedTerms:
    rows.require(*_NETWORKS, method="VGG-Flow (unpruned)")
    return unpruned_loss(
        f_theta,
        rows,
        config,
        policy=rows.policy_field,
        reference=rows.reference_field,
        value=rows.aux_field,
        reward=rows.sample_reward,
        terminal=rows.steps_remaining == 0,  # rows at the last sampling time
    )


def unpruned(f_theta: Tensor, rows: Transitions, config: VGGFlowConfig) -> Surrogate:
    """The registered unpruned loss: the value network is the rows' ``aux_field``."""
    terms = _unpruned_terms(f_theta, rows, config)
    return logged_surrogate(
        terms.total(config),
        {
            "loss_velocity": terms.velocity,
            "loss_consistency": terms.consistency,
            "loss_terminal": terms.terminal,
            "aux_norm": terms.value_norm,
            "aux_signal_norm": terms.guidance_norm,
        },
    )


def unpruned_coefficients(
    f_theta: Tensor, rows: Transitions, config: VGGFlowConfig, active: Tensor
) -> Coefficients:
    """The reduction of ``unpruned``: g_psi(x_t, t) folded into G (t = sigma, as ``unpruned_loss``)."""
    return coefficients(f_theta, rows, config, active, value=rows.aux_field(rows.x, rows.kernel.point.sigma))


# The published trainer's arm settings (spec §B.1-B.2): 8 prompts per rank, 20-step Euler ODE with
# CFG 5 and the unconditional half detached in training, every transition, microbatches of 4 rows.
_ARM = {
    "sampler": "ode",
    "sampler_steps": 20,
    "cfg": 5.0,
    "cfg_grad": "detach_uncond",
    "trajectories_per_epoch": 8,
    "collection_batch": 8,
    "transitions": "all",
    "estimator": "tweedie",
    "microbatch_rows": 4,
}
_TRAINING = dict(
    grid=grids.sd35_ode,
    relation=Relation.EXACT,
    signal=Signal.REWARD_GRADIENT,
    loss=loss,
    coefficients=coefficients,
    needs=("f_ref", "reward_grad"),
    arm="fo_trajectory",
)

METHOD = Method(
    name="vgg-flow",
    title="VGG-Flow (pruned)",
    table=TableRow(
        estimator="FO",
        lookahead="$k=0$ (current state, identity Jacobian)",
        branching="$K=1$",
        temporal_weight=r"$\eta(t)=(1-t)^2$",
        trust_region=r"quadratic anchor $\lambda_{reg}$ (default 0)",
        c1=r"$1/(d\kappa^2)$",
        g=r"$\lambda\eta(t)\hat g/(d|\kappa|)$",
        p=r"$\lambda_{reg}/(d\kappa^2)$",
    ),
    config=VGGFlowConfig(),
    arm_config=_ARM,
    note="pruned: value network and its losses removed; see unpruned_loss",
    **_TRAINING,
)

# The original algorithm (spec §B.5): the baseline's settings with the value network, one row per
# microbatch (batch 1 x accumulation 8 per the config comments: still 8 trajectories per update).
UNPRUNED = Method(
    name="vgg-flow-unpruned",
    title="VGG-Flow (unpruned)",
    config=PAPER,
    arm_config={**_ARM, "auxiliary": "value_adapter", "microbatch_rows": 1},
    note="the original algorithm: value network g_psi with its consistency and terminal losses",
    **{
        **_TRAINING,
        "loss": unpruned,
        "coefficients": unpruned_coefficients,
        "needs": ("f_ref", "reward_grad", *_NETWORKS),
    },
)

# The paper's redesign of the flow family (spec §B.3 OURS) and its Figure 6(a, b) ablations: the same
# loss with another estimator, temporal weight and scale.
METHODS = (
    METHOD,
    UNPRUNED,
    Method(
        name="reward-score-distillation-flow",
        title="Reward score distillation (flow)",
        family=Family.REDESIGN,
        config=REDESIGN,
        arm_config={**_ARM, "estimator": "terminal"},
        note="terminal-image reward gradient, eta = 1 - sigma at half the baseline's scale",
        **_TRAINING,
    ),
    Method(
        name="vgg-flow-linear-a",
        title="Linear Baseline A",
        family=Family.REDESIGN,
        config=LINEAR_A,
        arm_config=_ARM,
        note="the baseline's Tweedie estimator with eta = 1 - sigma at the baseline's scale",
        **_TRAINING,
    ),
    Method(
        name="vgg-flow-linear-b",
        title="Linear Baseline B",
        family=Family.REDESIGN,
        config=LINEAR_B,
        arm_config=_ARM,
        note="the baseline's Tweedie estimator with the redesign's scaled linear schedule",
        **_TRAINING,
    ),
)
