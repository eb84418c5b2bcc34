"""Affine noise schedules, Tweedie, and the score <-> native-output conversions.

Every reverse kernel and estimator in rsm_core is written in terms of the marginal coefficients
x_t = alpha_t x_0 + sigma_t eps (theory spec §1.2). Two parameterisations are used by the paper:

- ``"eps"``: epsilon prediction on any affine flow (SD1.5 and the toy use VP, alpha_t = sqrt(abar_t));
- ``"v"``:   velocity prediction on rectified flow, alpha_t = 1 - t, sigma_t = t (SD3 convention).

The score is affine in the native output, s = kappa_t f + e_t(x_t); kappa_t is the factor that maps
native-output differences to score differences (s_theta - s_phi = kappa_t (f_theta - f_phi)).
Time-dependent quantities are tensors broadcastable against the batch: a 0-d tensor, or one value
per sample of shape (B,), which ``per_sample`` reshapes to (B, 1, ..., 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Prediction = Literal["eps", "v"]
PREDICTIONS: tuple[str, ...] = ("eps", "v")


def per_sample(coef: Tensor | float, like: Tensor) -> Tensor:
    """Reshape a scalar or (B,) coefficient so it broadcasts against a (B, ...) batch."""
    coef = torch.as_tensor(coef, dtype=like.dtype, device=like.device)
    if coef.ndim == 0:
        return coef
    if coef.ndim != 1 or coef.shape[0] != like.shape[0]:
        raise ValueError(
            f"a per-sample coefficient must have shape ({like.shape[0]},), got {tuple(coef.shape)}"
        )
    return coef.reshape(-1, *([1] * (like.ndim - 1)))


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------


def vp_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear",
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """abar_t of a DDPM schedule; the defaults are SD1.5's scaled-linear 1000-step betas."""
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=dtype) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=dtype)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose 'scaled_linear' or 'linear'")
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(
    num_inference_steps: int = 50, num_train_timesteps: int = 1000, steps_offset: int = 1
) -> Tensor:
    """Descending DDIM timesteps with diffusers' "leading" spacing (SD1.5 50 steps: 981, 961, ..., 1)."""
    stride = num_train_timesteps // num_inference_steps
    return torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.long) * stride + steps_offset


def ddim_alpha_pairs(
    alphas_cumprod: Tensor, timesteps: Tensor, final_alpha_cumprod: float | None = None
) -> tuple[Tensor, Tensor]:
    """(abar_t, abar_t') for each step of a descending grid; t' = t - stride.

    A t' below 0 takes ``final_alpha_cumprod``: SD1.5 uses abar_0 (``set_alpha_to_one=False``), the
    default here; the toy's last step to the data uses 1.0.
    """
    stride = int(timesteps[0] - timesteps[1]) if len(timesteps) > 1 else int(timesteps[0]) + 1
    final = alphas_cumprod[0] if final_alpha_cumprod is None else torch.tensor(final_alpha_cumprod)
    prev = timesteps - stride
    abar_t = alphas_cumprod[timesteps]
    abar_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final.to(alphas_cumprod.dtype))
    return abar_t, abar_prev


def shift_sigmas(u: Tensor, shift: float) -> Tensor:
    """SD3's time shift sigma = shift u / (1 + (shift - 1) u)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sd3_sigmas(
    num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000, dtype: torch.dtype = torch.float64
) -> Tensor:
    """The FlowMatchEulerDiscreteScheduler grid of SD3.5 (zo_flow_tempflow spec §3), with 0 appended.

    The smallest training sigma is already shifted and the shift is applied a second time, which is
    what diffusers does; the result has num_steps + 1 entries from 1 down to 0.
    """
    smallest = shift_sigmas(torch.tensor(1.0 / num_train_timesteps, dtype=dtype), shift)
    u = torch.linspace(1.0, float(smallest), num_steps, dtype=dtype)
    return torch.cat([shift_sigmas(u, shift), torch.zeros(1, dtype=dtype)])


# ------------------------------------------------------------------------------------------------
# Marginal coefficients
# ------------------------------------------------------------------------------------------------


def vp_coefficients(abar: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) of a variance-preserving flow from abar_t."""
    return abar.sqrt(), (1.0 - abar).sqrt()


def rf_coefficients(t: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) = (1 - t, t) of rectified flow."""
    return 1.0 - t, t


def affine_velocity_kappa(alpha: Tensor, sigma: Tensor, dalpha: Tensor, dsigma: Tensor) -> Tensor:
    """kappa_t of velocity prediction on any affine flow: 1 / (alpha' sigma^2 / alpha - sigma sigma')."""
    return alpha / (dalpha * sigma**2 - alpha * sigma * dsigma)


# ------------------------------------------------------------------------------------------------
# One point in time of a flow: Tweedie and the score <-> native conversions
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimePoint:
    """Marginal coefficients at one time (0-d or per-sample (B,)) and the model's parameterisation.

    For ``"v"`` the flow is rectified flow, so alpha = 1 - t and sigma = t.
    """

    prediction: Prediction
    alpha: Tensor
    sigma: Tensor

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {PREDICTIONS}")

    @classmethod
    def vp(cls, abar: Tensor | float) -> TimePoint:
        """Epsilon prediction on a VP flow at cumulative alpha abar_t."""
        alpha, sigma = vp_coefficients(torch.as_tensor(abar, dtype=torch.float64))
        return cls("eps", alpha, sigma)

    @classmethod
    def rf(cls, t: Tensor | float) -> TimePoint:
        """Velocity prediction on rectified flow at time t (= sigma_t)."""
        alpha, sigma = rf_coefficients(torch.as_tensor(t, dtype=torch.float64))
        return cls("v", alpha, sigma)

    def select(self, index: Tensor) -> TimePoint:
        """The points at ``index`` of a grid stored as one (N,) point (e.g. random steps of a schedule)."""
        return TimePoint(self.prediction, self.alpha[index], self.sigma[index])

    @property
    def kappa(self) -> Tensor:
        """-1/sigma_t for eps; -(1 - t)/t for velocity (theory spec Eq. 126-127)."""
        if self.prediction == "eps":
            return -1.0 / self.sigma
        return -self.alpha / self.sigma

    def score(self, x: Tensor, f: Tensor) -> Tensor:
        """s(x_t, t) from the native output f."""
        a, s = per_sample(self.alpha, x), per_sample(self.sigma, x)
        if self.prediction == "eps":
            return -f / s
        return -(x + a * f) / s

    def native(self, x: Tensor, score: Tensor) -> Tensor:
        """The native output that has score ``score`` (inverse of ``score``)."""
        a, s = per_sample(self.alpha, x), per_sample(self.sigma, x)
        if self.prediction == "eps":
            return -s * score
        return -(x + s * score) / a

    def x0(self, x: Tensor, f: Tensor) -> Tensor:
        """Tweedie's E[x_0 | x_t]: (x - sigma eps)/alpha, or x - t v."""
        a, s = per_sample(self.alpha, x), per_sample(self.sigma, x)
        if self.prediction == "eps":
            return (x - s * f) / a
        return x - s * f

    def eps(self, x: Tensor, f: Tensor) -> Tensor:
        """The implied noise: f itself, or x + (1 - t) v."""
        if self.prediction == "eps":
            return f
        return x + per_sample(self.alpha, x) * f
