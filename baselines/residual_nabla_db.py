"""Residual nabla-DB (fo_first_order spec §A; theory spec §5.3, Eq. 68-78).

The pruned algorithm (what the RSM configs run): per transition x_t -> x_t',

    L_F  = mean_d (s_theta - s_ref - R abar_t' g)^2,   s = lambda (mu(x_t) - x_t') / nu^2,
    L_TR = unet_reg_scale mean_d (eps_theta - eps_old)^2,

with g = grad_{x_t'} r(decode(x0_hat_theta(x_t'))) (one-step lookahead through the policy, a detached
target) and abar_t' the 'squared' reward-adaptive factor. Canonical:
C1 = lambda^2 b^2/(d nu^4), G = lambda b R abar_t' g/(d nu^2), P = unet_reg_scale/(d kappa^2).

The unpruned algorithm (``unpruned_loss``) adds the residual network g_phi to the forward target,
a backward loss L_B on input-Jacobian scores and a terminal loss on g_phi. Their effect on theta:
L_B and the terminal loss carry no gradient to theta, and g_phi enters only as extra guidance in G,
which the reduction drops (the paper finds g_phi collapses to ~0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from baselines.method import Method, Relation, Signal, TableRow
from rsm_core import grids
from rsm_core.flows import per_sample
from rsm_core.kernels import reduce_per_sample
from rsm_core.loss import Coefficients, Surrogate
from rsm_core.transitions import Transitions

NativeAt = Callable[[Tensor], Tensor]  # a network evaluated at the rows' own time: x -> native output


@dataclass(frozen=True)
class NablaDBConfig:
    reward_scale: float = 5e5  # R of the RSM pruned-baseline config (1e4 in the original HPS config)
    pretrained_strength: float = 1.0  # lambda; both scores are multiplied by it in the RSM trainer
    unet_reg_scale: float = 1e2
    reverse_loss_scale: float = 1.0  # unpruned only
    terminal_loss_scale: float = 1.0  # unpruned only


def reward_factor(rows: Transitions) -> Tensor:
    """reward_adaptive_mode 'squared': abar at t' (the DDPM grid's t - 20, clamped to abar_0)."""
    return rows.kernel.prev.alpha**2


def _score(mean: Tensor, x_next: Tensor, rows: Transitions, config: NablaDBConfig) -> Tensor:
    """The code's "score" lambda (mu - x_t') / nu^2 of a model's kernel mean."""
    return config.pretrained_strength * (mean - x_next) / per_sample(rows.kernel.nu**2, mean)


def _reward_target(rows: Transitions, config: NablaDBConfig) -> Tensor:
    return per_sample(config.reward_scale * reward_factor(rows), rows.reward_grad) * rows.reward_grad


def _forward_and_trust_region(
    f_theta: Tensor, rows: Transitions, config: NablaDBConfig, extra_target: Tensor | None
) -> tuple[Tensor, Tensor]:
    x_next = rows.x_next.detach()
    s_theta = _score(rows.kernel.mean(rows.x, f_theta), x_next, rows, config)
    s_ref = _score(rows.kernel.mean(rows.x, rows.f_ref), x_next, rows, config).detach()
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
    """Pruned reduction; ``residual`` = g_phi(x_t') folds the unpruned target's residual into G."""
    kernel, d = rows.kernel, rows.elements
    strength = config.pretrained_strength
    target = _reward_target(rows, config)
    if residual is not None:
        target = target + residual.detach()
    c1 = strength**2 * kernel.w**2 / (d * kernel.nu**2)
    g = -per_sample(strength * kernel.w / (d * kernel.nu), target) * target
    p = torch.full_like(c1, config.unet_reg_scale / d)
    return Coefficients(c1, g, p)


# --- the unpruned algorithm ---------------------------------------------------------------------


@dataclass(frozen=True)
class UnprunedTerms:
    forward: Tensor  # (B,) L_F with g_phi(x_t') in the (non-detached) target
    backward: Tensor  # (B,) L_B
    terminal: Tensor  # (B,) mean_d g_phi(x_0)^2 on terminal transitions, 0 elsewhere
    trust_region: Tensor  # (B,)

    def total(self, config: NablaDBConfig) -> Tensor:
        return (
            self.forward
            + config.reverse_loss_scale * self.backward
            + config.terminal_loss_scale * self.terminal
            + self.trust_region
        )


def _input_score(native_at: NativeAt, rows: Transitions, x_next: Tensor, config: NablaDBConfig) -> Tensor:
    """lambda grad_{x_t} [-||x_t' - mu(x_t)||^2 / (2 nu^2)], by autograd without a higher-order graph
    (create_graph=False, as released), so it is a constant for every parameter."""
    with torch.enable_grad():
        x = rows.x.detach().requires_grad_(True)
        mean = rows.kernel.mean(x, native_at(x))
        log_density = -reduce_per_sample((x_next - mean) ** 2, "sum") / (2 * rows.kernel.nu**2)
        (grad,) = torch.autograd.grad(log_density.sum(), x)
    return config.pretrained_strength * grad


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
    """The original nabla-GFN loss (fo_first_order spec §A.6) on rows that carry the lookahead
    reward gradient at x_t' (``reward_grad``); ``residual_now``/``residual_next`` are g_phi(x_t, t) and
    g_phi(x_t', t') with their graph to phi, ``reward_grad_now`` = grad_{x_t} r(decode(x0_hat_theta(x_t)))
    and ``terminal`` marks the last transition (t = 1 -> x_0)."""
    rows.require("f_ref", "reward_grad", method="Residual nabla-DB (unpruned)")
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

    terminal_loss = terminal * reduce_per_sample(residual_next**2, "mean")
    return UnprunedTerms(forward, backward, terminal_loss, trust_region)


METHOD = Method(
    name="residual-nabla-db",
    title=r"Residual $\nabla$-DB (pruned)",
    grid=grids.sd15_ddpm,
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
    relation=Relation.EXACT,
    signal=Signal.REWARD_GRADIENT,
    config=NablaDBConfig(),
    loss=loss,
    coefficients=coefficients,
    needs=("f_ref", "reward_grad"),
    note="pruned: residual net, backward and terminal losses removed; see unpruned_loss",
)
