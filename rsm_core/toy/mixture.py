"""The 2-D Gaussian-mixture world of the toy study, with exact scores and exact targets (toy spec §1-3).

p_ref is an equal-weight mixture of three unit Gaussians; the linear reward r(x) = -x_1/2 + 3 tilts
it into p* = p_ref exp(r) / Z, again a unit-Gaussian mixture. A VP flow keeps unit covariances, so
every noised marginal, its score, Tweedie's mean and both value-gradient targets are closed-form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rsm_core.flows import vp_alphas_cumprod

SQRT3 = math.sqrt(3.0)
REFERENCE_MEANS = ((3.0, -SQRT3), (-3.0, -SQRT3), (0.0, 2 * SQRT3))
REWARD_GRADIENT = (-0.5, 0.0)  # c = grad r
REWARD_OFFSET = 3.0
NUM_TIMESTEPS = 500
EVAL_TIMESTEP = 389  # abar = 0.0098482, the paper's "abar_t = 0.01"


def toy_alphas_cumprod() -> Tensor:
    """T = 500 DDPM steps with betas linear from 1e-4 to 0.03."""
    return vp_alphas_cumprod(NUM_TIMESTEPS, 1e-4, 0.03, "linear")


def reward(x: Tensor) -> Tensor:
    """r(x) = -x_1 / 2 + 3, differentiable."""
    c = torch.tensor(REWARD_GRADIENT, dtype=x.dtype, device=x.device)
    return x @ c + REWARD_OFFSET


@dataclass(frozen=True)
class UnitMixture:
    """sum_k weight_k N(mean_k, I) in R^2 (unit covariance at every noise level of a VP flow)."""

    means: Tensor  # (K, 2)
    weights: Tensor  # (K,)

    @classmethod
    def reference(cls) -> UnitMixture:
        means = torch.tensor(REFERENCE_MEANS, dtype=torch.float64)
        return cls(means, torch.full((3,), 1 / 3, dtype=torch.float64))

    def tilted(self, c: Tensor) -> UnitMixture:
        """p exp(c.x) / Z: each N(m, I) becomes N(m + c, I) with mass times exp(c.m + |c|^2/2)."""
        log_mass = torch.log(self.weights) + self.means @ c + 0.5 * (c @ c)
        return UnitMixture(self.means + c, torch.softmax(log_mass, dim=0))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=self.means.dtype)
        return self.means[component] + noise

    def posterior(self, x: Tensor, abar: Tensor | float) -> Tensor:
        """rho_k(x) = P(component k | x_t = x), shape (B, K)."""
        centres = math.sqrt(float(abar)) * self.means.to(x.dtype)
        logits = torch.log(self.weights.to(x.dtype)) - 0.5 * torch.cdist(x, centres) ** 2
        return torch.softmax(logits, dim=1)

    def score(self, x: Tensor, abar: Tensor | float) -> Tensor:
        """grad log p_t(x) = sum_k rho_k (sqrt(abar) m_k - x)."""
        rho = self.posterior(x, abar)
        return math.sqrt(float(abar)) * rho @ self.means.to(x.dtype) - x

    def eps(self, x: Tensor, abar: Tensor | float) -> Tensor:
        """The exact epsilon prediction -sqrt(1 - abar) score (the oracle denoiser)."""
        return -math.sqrt(1 - float(abar)) * self.score(x, abar)


def reward_gradient(dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.tensor(REWARD_GRADIENT, dtype=dtype)


def soft_ground_truth(x: Tensor, abar: float) -> Tensor:
    """The paper's target: grad log p*_t - grad log p_ref,t (Eq. 8 with alpha = 1)."""
    ref = UnitMixture.reference()
    return ref.tilted(reward_gradient()).score(x, abar) - ref.score(x, abar)


def hard_value_gradient(x: Tensor, abar: float) -> Tensor:
    """grad_x E_{p*}[r(x_0) | x_t = x] = sqrt(abar) (c + (1 - abar) Cov_rho*(m) c) (toy spec §3).

    What estimators built on the plain terminal reward converge to.
    """
    c = reward_gradient(x.dtype)
    tilted = UnitMixture.reference().tilted(c)
    rho = tilted.posterior(x, abar)  # (B, K)
    means = tilted.means.to(x.dtype)
    centred = means.unsqueeze(0) - (rho @ means).unsqueeze(1)  # (B, K, 2)
    cov_c = torch.einsum("bk,bki,bkj,j->bi", rho, centred, centred, c)
    return math.sqrt(abar) * (c + (1 - abar) * cov_c)
