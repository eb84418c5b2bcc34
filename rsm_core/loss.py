"""The canonical RSM loss (theory spec §2.3-2.4) and the trust-region realisations.

Per transition, with every coefficient a stop-gradient constant,

    L = C1 (||s_theta - (s_ref + gamma Psi)||^2 + C2 ||s_theta - s_old||^2)           (nested, Eq. 10)

is stored as the products C1, G = C1 gamma Psi (a vector) and P = C1 C2 (a scalar), because Psi and
C2 are singular at alpha = 0 while the products are not. Dropping theta-free constants,

    l = C1 ||s_theta - s_ref||^2 - 2 <G, s_theta - s_ref> + P ||s_theta - s_old||^2,
    grad l = 2 J^T [C1 (s_theta - s_ref) - G + P (s_theta - s_old)].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from rsm_core.flows import per_sample
from rsm_core.kernels import reduce_per_sample


@dataclass(frozen=True)
class Coefficients:
    """Per-sample C1 (B,), G (B, *D) and P (B,) of the canonical loss."""

    c1: Tensor
    g: Tensor
    p: Tensor

    @classmethod
    def from_nested(cls, c1: Tensor, gamma: Tensor, psi: Tensor, c2: Tensor) -> Coefficients:
        """C1, gamma, Psi_hat, C2 of Eq. 10 -> the product form (defined only for finite Psi, C2)."""
        return cls(c1, per_sample(c1 * gamma, psi) * psi, c1 * c2)


def rsm_loss(s_theta: Tensor, s_ref: Tensor, s_old: Tensor, coef: Coefficients) -> Tensor:
    """Per-sample canonical loss in product form; s_ref, s_old and the coefficients carry no gradient."""
    to_ref = s_theta - s_ref.detach()
    to_old = s_theta - s_old.detach()
    c1, p = per_sample(coef.c1, s_theta).detach(), per_sample(coef.p, s_theta).detach()
    per_element = c1 * to_ref**2 - 2 * coef.g.detach() * to_ref + p * to_old**2
    return reduce_per_sample(per_element, "sum")


def rsm_loss_nested(
    s_theta: Tensor, s_ref: Tensor, s_old: Tensor, c1: Tensor, gamma: Tensor, psi: Tensor, c2: Tensor
) -> Tensor:
    """Eq. 10 as written: C1 (||s_theta - s_ref - gamma Psi||^2 + C2 ||s_theta - s_old||^2)."""
    target = s_ref.detach() + per_sample(gamma, psi) * psi.detach()
    guided = reduce_per_sample((s_theta - target) ** 2, "sum")
    anchor = reduce_per_sample((s_theta - s_old.detach()) ** 2, "sum")
    return c1 * (guided + c2 * anchor)


# ------------------------------------------------------------------------------------------------
# Trust regions on the policy-gradient surrogate. Each returns the per-sample loss and the mask of
# samples whose unclipped branch is selected (the only ones with a gradient through the ratio).
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Surrogate:
    loss: Tensor  # (B,)
    active: Tensor  # (B,) bool
    # detached per-row values the loss computed on the way, for the arm to log (e.g. the separate
    # terms of an unpruned algorithm and the size of its auxiliary network's output)
    extras: dict[str, Tensor] = field(default_factory=dict)


def _active(adv: Tensor, value: Tensor, low: float, high: float) -> Tensor:
    return ~(((adv > 0) & (value > high)) | ((adv < 0) & (value < low)))


def clipped_ratio(log_ratio: Tensor, adv: Tensor, clip_range: float) -> Surrogate:
    """PPO / GRPO: max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(log rho)."""
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(-adv * ratio, -adv * clipped)
    return Surrogate(loss, _active(adv, ratio, 1 - clip_range, 1 + clip_range))


def clipped_log_ratio(log_ratio: Tensor, adv: Tensor, clip_range: float) -> Surrogate:
    """PCPO-base: max(-A (1 + log rho), -A clip(1 + log rho, 1 - eps, 1 + eps))."""
    value = 1 + log_ratio
    clipped = value.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(-adv * value, -adv * clipped)
    return Surrogate(loss, _active(adv, value, 1 - clip_range, 1 + clip_range))


def matching(log_ratio: Tensor, adv: Tensor, clip_range: float) -> Surrogate:
    """RSM "matching": max(eps |A| - A log rho, 0); same gradients as ``clipped_log_ratio``."""
    margin = clip_range * adv.abs() - adv * log_ratio
    return Surrogate(torch.clamp(margin, min=0), margin > 0)


SURROGATES = {"ratio": clipped_ratio, "matching": matching}


def scaled_surrogate(
    log_ratio: Tensor,
    adv: Tensor,
    clip_range: float,
    *,
    form: str,
    clip_scale: Tensor | float = 1.0,
    weight: Tensor | float = 1.0,
) -> Surrogate:
    """A trust region on clip_scale * log rho, its clipped term multiplied by ``weight`` outside.

    form "ratio" is PPO's clipped ratio, "matching" the clipped log-ratio. Fair clipping (Eq. 24) is
    ``fair_clip_scales``: the clip acts in mean-shift units and the rescaling is undone outside.
    """
    if form not in SURROGATES:
        raise ValueError(f"unknown trust-region form {form!r}; choose one of {sorted(SURROGATES)}")
    inner = SURROGATES[form](clip_scale * log_ratio, adv, clip_range)
    return Surrogate(weight * inner.loss, inner.active)


def fair_clip_scales(nu: Tensor, gamma: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """(clip scale, outer weight) of fair clipping: clip nu_t^2 log rho, weight gamma_t / nu_t^2.

    nu_t^2 log rho is a mean shift in latent units, so the clip width means the same at every step;
    gamma_t = 1 is ``fair_clip``, gamma_t = nu_t / delta_t the published GenEval run (``fair_clip2``).
    """
    return nu**2, gamma / nu**2
