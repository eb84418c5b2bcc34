"""The paper's sampling grids as one kernel per grid with (N,) coefficients, one entry per trained step.

Each method is defined on its own grid (theory spec §4): SD1.5's 50-step DDIM/DDPM grid, PCPO's
uw-sigma variant of it, SD3.5-M's 10-step Flow-GRPO SDE grid (shift 3, 9 trained transitions) and
VGG-Flow's 20-step Euler ODE grid (shift 3). ``Kernel.select`` picks steps for a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rsm_core import flows, kernels
from rsm_core.kernels import Kernel


@dataclass(frozen=True)
class Grid:
    """The trained transitions of one sampler: kernel i goes from grid point i to i + 1."""

    name: str
    kernel: Kernel  # coefficients of shape (N,)
    timesteps: Tensor  # (N,) the model's time input: DDPM index (VP) or t in [0, 1] (flow)
    total_steps: int  # steps of the full sampler (a trained subset may drop the last ones)

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def steps_remaining(self) -> Tensor:
        """n_t: sampler steps left after each transition (SQDF's discount exponent)."""
        return self.total_steps - 1 - torch.arange(len(self))


def _sd15_pairs(steps: int) -> tuple[Tensor, Tensor, Tensor]:
    timesteps = flows.ddim_timesteps(steps)
    abar, abar_prev = flows.ddim_alpha_pairs(flows.vp_alphas_cumprod(), timesteps)
    return timesteps, abar, abar_prev


def sd15_ddpm(steps: int = 50, eta: float = 1.0) -> Grid:
    """SD1.5 DDIM(eta) on the leading-spacing grid 981, 961, ..., 1 (eta = 1: DDPM variance)."""
    timesteps, abar, abar_prev = _sd15_pairs(steps)
    return Grid(f"sd15-ddim{steps}", kernels.ddim(abar, abar_prev, eta), timesteps.double(), steps)


def sd15_pcpo(steps: int = 50, weight: float = 4.5, trained: int = 49) -> Grid:
    """PCPO's uw-sigma sampler on the SD1.5 grid; the baseline trains the first 49 of 50 transitions."""
    timesteps, abar, abar_prev = _sd15_pairs(steps)
    kernel = kernels.pcpo_sde(abar, abar_prev, weight).select(torch.arange(trained))
    return Grid(f"sd15-pcpo{steps}", kernel, timesteps[:trained].double(), steps)


def sd35_flow_grpo(steps: int = 10, shift: float = 3.0, noise_level: float = 0.7, trained: int = 9) -> Grid:
    """SD3.5-M's Flow-GRPO SDE grid; TempFlow-GRPO and GRPO-Guard train the first 9 of 10 steps."""
    sigmas = flows.sd3_sigmas(steps, shift)
    t, t_prev = sigmas[:trained], sigmas[1 : trained + 1]
    kernel = kernels.flow_grpo_sde(t, t_prev, t_max=float(sigmas[1]), noise_level=noise_level)
    return Grid(f"sd35-sde{steps}", kernel, t, steps)


def sd35_ode(steps: int = 20, shift: float = 3.0) -> Grid:
    """VGG-Flow's Euler ODE grid on SD3.5-M: all transitions are trained."""
    sigmas = flows.sd3_sigmas(steps, shift)
    return Grid(f"sd35-ode{steps}", kernels.flow_ode(sigmas[:-1], sigmas[1:]), sigmas[:-1], steps)
