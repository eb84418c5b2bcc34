"""Temporal weights gamma(t) and the normalised influence metric h(t) (theory spec §4).

h(t) = 2 C1(t) gamma(t) |kappa_t| c_t is the scalar with which a unit reward-gradient signal enters
the native-output update when the estimator is written Psi = c_t g_hat. Its normalised form
h / sum_t h lets methods with different losses and reward scales be compared on one axis.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rsm_core import flows, kernels

EtaMode = Literal["quad", "linear", "constant"]


def vgg_flow_eta(t: Tensor, mode: EtaMode = "quad") -> Tensor:
    """VGG-Flow's eta(t): (1 - t)^2 ('quad', the published default), 1 - t ('linear'), 1 ('constant')."""
    if mode == "quad":
        return (1 - t) ** 2
    if mode == "linear":
        return 1 - t
    if mode == "constant":
        return torch.ones_like(t)
    raise ValueError(f"unknown eta mode {mode!r}; choose 'quad', 'linear' or 'constant'")


def tempflow_weight(nu: Tensor) -> Tensor:
    """TempFlow-GRPO's noise weighting nu_t / mean_t nu_t over the trained steps (2.25 nu_t on SD3.5)."""
    return nu / nu.mean()


def grpo_guard_weight(nu: Tensor, delta: Tensor) -> Tensor:
    """GRPO-Guard's rescaling nu_t / delta_t (= sigma_tilde_t / sqrt(delta_t))."""
    return nu / delta


def sqdf_discount(gamma: float, steps_remaining: Tensor) -> Tensor:
    """SQDF's gamma^{n_t}, n_t = number of steps remaining after this one."""
    return gamma ** steps_remaining.to(torch.float64)


def gapped_ddpm_std(abar: Tensor, gap: int, alphas_cumprod: Tensor | None = None) -> Tensor:
    """sigma~_t: the eta = 1 DDPM std from t to max(t - gap, 0), t the DDPM index of ``abar``.

    The RSM SD1.5 trainer's 'sigma' strength and reward factor (fo_first_order spec §A.3 note, E.14):
    its helper steps back 1000 // 51 = 19 indices because the subsampled timestep array has 51
    columns, while the kernel steps 20. Rows carry abar_t rather than t, so t is looked up in the
    table (default: SD1.5's); an abar that is not in it is an error.
    """
    table = flows.vp_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.double()
    abar = torch.as_tensor(abar, dtype=torch.float64)
    distance = (abar.reshape(-1, 1) - table).abs()
    t = distance.argmin(dim=1)
    if not bool(torch.all(distance[torch.arange(t.numel()), t] <= 1e-6 * abar.reshape(-1))):
        raise ValueError("gapped_ddpm_std needs abar_t values of the DDPM table (rows on the SD1.5 grid)")
    return kernels.ddpm_std(table[t], table[(t - gap).clamp(min=0)]).reshape(abar.shape)


def influence(c1: Tensor, gamma: Tensor, kappa: Tensor, c: Tensor) -> Tensor:
    """h(t) = 2 C1 gamma |kappa| c (Eq. 23)."""
    return 2 * c1 * gamma * kappa.abs() * c


def influence_from_products(g_per_signal: Tensor, kappa: Tensor) -> Tensor:
    """h(t) = 2 |kappa| G / g_hat, for methods stated in product form (alpha = 0 allowed)."""
    return 2 * kappa.abs() * g_per_signal


def normalized(h: Tensor) -> Tensor:
    """h / sum_t h over the trained transitions (the paper's "normalised" influence)."""
    total = h.sum()
    if not bool(total > 0):
        raise ValueError("the influence must have a positive sum over the trained steps to be normalised")
    return h / total
