"""Gaussian reverse kernels p(x_t' | x_t) = N(a_t x_t + b_t s(x_t, t), nu_t^2 I) (theory spec §1.3).

Each kernel is stored in its native-output form, mean = A x + B f, because at t = 1 of rectified
flow a_t and b_t diverge (and kappa_t -> 0) while A, B and w_t stay finite. a_t and b_t are derived
from A and B through s = kappa_t f + e_t x (e_t = 0 for eps, -1/t for rectified-flow velocity).

Log-probabilities and KLs come in two reductions: "sum" over the elements of a sample (the true
density) and "mean" (the per-element mean that DDPO, Flow-GRPO and the RSM code use, i.e. / d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rsm_core.flows import TimePoint, per_sample

Reduction = Literal["sum", "mean", "none"]


def reduce_per_sample(values: Tensor, reduction: Reduction) -> Tensor:
    """Sum or mean over every dimension but the first (batch); "none" keeps the elements."""
    if reduction == "none":
        return values
    dims = tuple(range(1, values.ndim))
    if reduction == "sum":
        return values.sum(dim=dims)
    if reduction == "mean":
        return values.mean(dim=dims)
    raise ValueError(f"unknown reduction {reduction!r}; choose 'sum', 'mean' or 'none'")


def _t(value: Tensor | float) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


@dataclass(frozen=True)
class Kernel:
    """One reverse step t -> t' of a first-order sampler; coefficients are 0-d or per-sample (B,)."""

    point: TimePoint  # the time t the step starts from (its kappa and parameterisation)
    prev: TimePoint  # the time t' it lands on
    x_coef: Tensor  # A in mean = A x + B f
    f_coef: Tensor  # B = b_t kappa_t (< 0 for every sampler here)
    nu: Tensor  # per-step standard deviation; 0 for an ODE step
    name: str = "kernel"

    # --- the paper's coefficients ------------------------------------------------------------
    @property
    def kappa(self) -> Tensor:
        return self.point.kappa

    @property
    def b(self) -> Tensor:
        """The score coefficient b_t (infinite at t = 1 of rectified flow)."""
        return self.f_coef / self.kappa

    @property
    def a(self) -> Tensor:
        """a_t = alpha_t' / alpha_t for every sampler here."""
        if self.point.prediction == "eps":
            return self.x_coef
        return self.x_coef + self.b / self.point.sigma  # undo e_t = -1/t folded into A

    @property
    def w(self) -> Tensor:
        """The sampler weight w_t = b_t |kappa_t| / nu_t = |B| / nu_t (Eq. 128)."""
        return self.f_coef.abs() / self.nu

    @property
    def stochastic(self) -> bool:
        return bool(torch.all(self.nu > 0))

    # --- the step ----------------------------------------------------------------------------
    def mean(self, x: Tensor, f: Tensor) -> Tensor:
        return per_sample(self.x_coef, x) * x + per_sample(self.f_coef, x) * f

    def sample(self, x: Tensor, f: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t' = mean + nu * noise; noise defaults to fresh standard normal draws."""
        if noise is None:
            noise = torch.randn_like(x)
        return self.mean(x, f) + per_sample(self.nu, x) * noise

    def noise_of(self, x_next: Tensor, x: Tensor, f: Tensor) -> Tensor:
        """The standard-normal draw that took x to x_next under this kernel."""
        self._require_noise("noise_of")
        return (x_next - self.mean(x, f)) / per_sample(self.nu, x)

    def log_prob(self, x_next: Tensor, x: Tensor, f: Tensor, reduction: Reduction = "sum") -> Tensor:
        """log N(x_next; mean(x, f), nu^2 I), summed or averaged over the elements of each sample."""
        self._require_noise("log_prob")
        nu = per_sample(self.nu, x)
        z = (x_next - self.mean(x, f)) / nu
        elementwise = -0.5 * z**2 - torch.log(nu) - 0.5 * math.log(2 * math.pi)
        return reduce_per_sample(elementwise, reduction)

    def kl(self, f_p: Tensor, f_q: Tensor, x: Tensor | None = None, reduction: Reduction = "sum") -> Tensor:
        """KL(p || q) of two kernels that differ only in the native output: ||B (f_p - f_q)||^2 / (2 nu^2).

        Equals (w_t^2 / 2) ||f_p - f_q||^2 (theory spec §1.4); x is not needed since A x cancels.
        """
        self._require_noise("kl")
        diff = f_p - f_q
        w = per_sample(self.w, diff)
        return reduce_per_sample(0.5 * (w * diff) ** 2, reduction)

    def select(self, index: Tensor) -> Kernel:
        """The kernels at ``index`` of a grid stored as one kernel with (N,) coefficients."""
        return Kernel(
            self.point.select(index),
            self.prev.select(index),
            self.x_coef[index],
            self.f_coef[index],
            self.nu[index],
            name=self.name,
        )

    def deterministic(self) -> Kernel:
        """The ODE step over the same interval (what stochasticity localisation turns a step into)."""
        return ode(self.point, self.prev)

    def _require_noise(self, what: str) -> None:
        if not self.stochastic:
            raise ValueError(
                f"{what} needs a stochastic kernel; {self.name} has nu = 0 (an ODE step has no density)"
            )


# ------------------------------------------------------------------------------------------------
# Variance-preserving flow, epsilon prediction
# ------------------------------------------------------------------------------------------------


def ddpm_std(abar: Tensor | float, abar_prev: Tensor | float) -> Tensor:
    """The DDPM posterior std sqrt((1 - abar')/(1 - abar) (1 - abar/abar')) (DDIM at eta = 1)."""
    abar, abar_prev = _t(abar), _t(abar_prev)
    return ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()


def ddim_with_std(abar: Tensor | float, abar_prev: Tensor | float, nu: Tensor | float, name: str) -> Kernel:
    """The DDIM step with a given per-step std: mean = sqrt(abar'/abar) x - (c1 - c2) eps_hat,
    c1 = sqrt(1 - abar) sqrt(abar'/abar), c2 = sqrt(1 - abar' - nu^2)."""
    abar, abar_prev, nu = _t(abar), _t(abar_prev), _t(nu)
    c1 = (1 - abar).sqrt() * (abar_prev / abar).sqrt()
    c2 = (1 - abar_prev - nu**2).clamp(min=0).sqrt()
    return Kernel(
        TimePoint.vp(abar), TimePoint.vp(abar_prev), (abar_prev / abar).sqrt(), -(c1 - c2), nu, name=name
    )


def ddim(abar: Tensor | float, abar_prev: Tensor | float, eta: float = 1.0) -> Kernel:
    """DDIM(eta) on VP: nu = eta * the DDPM std; eta = 1 is DDPM."""
    return ddim_with_std(abar, abar_prev, eta * ddpm_std(abar, abar_prev), name=f"ddim(eta={eta:g})")


def pcpo_uw_sigma_std(
    abar: Tensor | float, abar_prev: Tensor | float, weight: float = 4.5, eta: float = 1.0
) -> Tensor:
    """PCPO's "uw-sigma" std nu' = (W c1 + sqrt((1 - abar')(W^2 + 1) - c1^2)) / (W^2 + 1), times eta.

    This is the root the published code takes: it makes (c1 + c2)/nu' = W, not the kernel weight
    (c1 - c2)/nu' (zo_diffusion_pcpo spec §2); PCPO flattens its temporal weight in the loss instead.
    """
    abar, abar_prev = _t(abar), _t(abar_prev)
    c1 = (1 - abar).sqrt() * (abar_prev / abar).sqrt()
    root = ((1 - abar_prev) * (weight**2 + 1) - c1**2).sqrt()
    return eta * (weight * c1 + root) / (weight**2 + 1)


def pcpo_sde(
    abar: Tensor | float, abar_prev: Tensor | float, weight: float = 4.5, eta: float = 1.0
) -> Kernel:
    """The DDIM step with PCPO's uw-sigma std (the PCPO baseline's sampler)."""
    return ddim_with_std(abar, abar_prev, pcpo_uw_sigma_std(abar, abar_prev, weight, eta), name="pcpo_sde")


def dpm_solver_pp1_sde(abar: Tensor | float, abar_prev: Tensor | float) -> Kernel:
    """First-order SDE-DPM-Solver++ on VP (Eq. 118-120), written through Tweedie's x0."""
    point, prev = TimePoint.vp(abar), TimePoint.vp(abar_prev)
    h = torch.log(prev.alpha / prev.sigma) - torch.log(point.alpha / point.sigma)
    decay = 1 - torch.exp(-2 * h)
    # mean = (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) (x - sigma eps)/alpha
    x_coef = prev.sigma / point.sigma * torch.exp(-h) + prev.alpha * decay / point.alpha
    f_coef = -prev.alpha * decay * point.sigma / point.alpha
    return Kernel(point, prev, x_coef, f_coef, prev.sigma * decay.sqrt(), name="dpm_solver_pp1_sde")


def vp_ode(abar: Tensor | float, abar_prev: Tensor | float) -> Kernel:
    """The probability-flow step of first-order DPM-Solver++ (exponential integrator, no noise).

    Written independently of DDIM so that "DDIM at eta = 0 is the ODE step" is a real test.
    """
    point, prev = TimePoint.vp(abar), TimePoint.vp(abar_prev)
    h = torch.log(prev.alpha / prev.sigma) - torch.log(point.alpha / point.sigma)
    gain = prev.alpha * (1 - torch.exp(-h))  # multiplies x0_hat
    x_coef = prev.sigma / point.sigma + gain / point.alpha
    f_coef = -gain * point.sigma / point.alpha
    return Kernel(point, prev, x_coef, f_coef, torch.zeros_like(x_coef), name="vp_ode")


# ------------------------------------------------------------------------------------------------
# Rectified flow, velocity prediction (t = 1 noise, t = 0 data; a step goes from t to t' = t - delta)
# ------------------------------------------------------------------------------------------------


def flow_sde(
    t: Tensor | float, t_prev: Tensor | float, sigma_tilde: Tensor | float, name: str = "flow_sde"
) -> Kernel:
    """Euler step of the reverse flow SDE with local noise level sigma_tilde (Eq. 121-124).

    mean = x - delta [v + (sigma_tilde^2 / (2t)) (x + (1 - t) v)], nu = sigma_tilde sqrt(delta).
    """
    t, t_prev, sig = _t(t), _t(t_prev), _t(sigma_tilde)
    delta = t - t_prev
    x_coef = 1 - delta * sig**2 / (2 * t)
    f_coef = -delta * (1 + sig**2 * (1 - t) / (2 * t))
    return Kernel(TimePoint.rf(t), TimePoint.rf(t_prev), x_coef, f_coef, sig * delta.sqrt(), name=name)


def flow_grpo_noise_level(t: Tensor | float, t_max: float, noise_level: float = 0.7) -> Tensor:
    """Flow-GRPO's sigma_tilde = a sqrt(t / (1 - t)), with t_max (the grid's second value) in the
    denominator at t = 1 so the first step stays finite (a = 0.7 gives 3.5 on the SD3.5 grid)."""
    t = _t(t)
    denominator_t = torch.where(t >= 1.0, torch.full_like(t, t_max), t)
    return noise_level * (t / (1 - denominator_t)).sqrt()


def flow_grpo_sde(
    t: Tensor | float, t_prev: Tensor | float, t_max: float, noise_level: float = 0.7
) -> Kernel:
    """The Flow-GRPO SDE step (shared by Flow-GRPO, TempFlow-GRPO, GRPO-Guard)."""
    return flow_sde(t, t_prev, flow_grpo_noise_level(t, t_max, noise_level), name="flow_grpo_sde")


def dance_sde(t: Tensor | float, t_prev: Tensor | float, eta: float = 0.3) -> Kernel:
    """Dance-GRPO's SDE: constant sigma_tilde = eta (the spec marks eta's value as a guess)."""
    return flow_sde(t, t_prev, eta, name="dance_sde")


def flow_ode(t: Tensor | float, t_prev: Tensor | float) -> Kernel:
    """Euler step of the flow ODE, x' = x - delta v (the VGG-Flow sampler)."""
    t, t_prev = _t(t), _t(t_prev)
    delta = t - t_prev
    return Kernel(
        TimePoint.rf(t),
        TimePoint.rf(t_prev),
        torch.ones_like(t),
        -delta,
        torch.zeros_like(t),
        name="flow_ode",
    )


def ode(point: TimePoint, prev: TimePoint) -> Kernel:
    """The deterministic first-order step between two time points of the same flow."""
    if point.prediction == "eps":
        return vp_ode(point.alpha**2, prev.alpha**2)
    return flow_ode(point.sigma, prev.sigma)
