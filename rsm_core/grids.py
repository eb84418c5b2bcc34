"""The one home of every sampler grid: one kernel per grid with (N,) coefficients, one entry per step.

A ``Grid`` is what a sampler walks (``grid[i]`` is the step from point i to i + 1) and what a batch of
training rows indexes (``grid.kernel.select(steps)``). The builders cover both flows of the harness —
rectified flow with velocity (Euler ODE, the Flow-GRPO SDE) and VP with eps (DDIM at any eta, PCPO's
uw-sigma SDE) — and the paper's own grids are these builders on each method's schedule (theory spec
§4): SD1.5's 50-step DDIM/DDPM grid, PCPO's uw-sigma variant of it, SD3.5-M's 10-step Flow-GRPO SDE
grid (shift 3, 9 trained transitions) and VGG-Flow's 20-step Euler ODE grid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from rsm_core import flows, kernels
from rsm_core.kernels import Kernel


@dataclass(frozen=True)
class Grid:
    """The transitions of one sampler: kernel i goes from grid point i to i + 1."""

    name: str
    kernel: Kernel  # coefficients of shape (N,)
    timesteps: Tensor  # (N,) the model's time input: DDPM index (VP) or t in [0, 1] (flow)
    total_steps: int  # steps of the full sampler (a trained subset may drop the last ones)

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def __getitem__(self, step: int) -> Kernel:
        """The single-step kernel of step ``step`` (0-d coefficients)."""
        if not -len(self) <= step < len(self):
            raise IndexError(f"step {step} is outside the {len(self)}-step grid {self.name}")
        return self.kernel.select(torch.tensor(step % len(self)))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def trained(self, steps: int) -> Grid:
        """The first ``steps`` transitions (the published trainers drop the last ones)."""
        index = torch.arange(steps)
        return Grid(self.name, self.kernel.select(index), self.timesteps[:steps], self.total_steps)

    @property
    def steps_remaining(self) -> Tensor:
        """n_t: sampler steps left after each transition (SQDF's discount exponent)."""
        return self.total_steps - 1 - torch.arange(len(self))


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------


def flow_ode(sigmas: Tensor) -> Grid:
    """Euler steps of the rectified-flow ODE over ``sigmas`` (1 -> 0, one more point than steps)."""
    sigmas = sigmas.double()
    return Grid(
        f"flow-ode{len(sigmas) - 1}", kernels.flow_ode(sigmas[:-1], sigmas[1:]), sigmas[:-1], len(sigmas) - 1
    )


def flow_grpo_sde(sigmas: Tensor, noise_level: float = 0.7) -> Grid:
    """The Flow-GRPO SDE over ``sigmas``; sigma_tilde at t = 1 uses the grid's second point (spec §4)."""
    sigmas = sigmas.double()
    kernel = kernels.flow_grpo_sde(sigmas[:-1], sigmas[1:], t_max=float(sigmas[1]), noise_level=noise_level)
    return Grid(f"flow-sde{len(sigmas) - 1}", kernel, sigmas[:-1], len(sigmas) - 1)


def vp_ddim(alphas_cumprod: Tensor, timesteps: Tensor, eta: float) -> Grid:
    """DDIM(eta) on a descending DDPM-index grid (eta = 0: the ODE step, eta = 1: DDPM)."""
    abar, abar_prev = flows.ddim_alpha_pairs(alphas_cumprod.double(), timesteps)
    kernel = kernels.ddim(abar, abar_prev, eta)
    return Grid(f"ddim{len(timesteps)}(eta={eta:g})", kernel, timesteps.double(), len(timesteps))


def vp_pcpo(alphas_cumprod: Tensor, timesteps: Tensor, weight: float = 4.5) -> Grid:
    """DDIM with PCPO's uw-sigma std on a descending DDPM-index grid."""
    abar, abar_prev = flows.ddim_alpha_pairs(alphas_cumprod.double(), timesteps)
    kernel = kernels.pcpo_sde(abar, abar_prev, weight)
    undefined = torch.nonzero(torch.isnan(kernel.nu)).flatten().tolist()
    if undefined:  # (1 - abar')(W^2 + 1) < c1^2: the quadratic has no real root on so coarse a step
        raise ValueError(
            f"PCPO's uw-sigma std (W = {weight:g}) has no real root at steps {undefined} of this "
            f"{len(timesteps)}-step grid; use a finer grid (SD1.5's schedule needs at least 28 steps)"
        )
    return Grid(f"pcpo{len(timesteps)}", kernel, timesteps.double(), len(timesteps))


# ------------------------------------------------------------------------------------------------
# The paper's grids
# ------------------------------------------------------------------------------------------------


def sd15_ddpm(steps: int = 50, eta: float = 1.0) -> Grid:
    """SD1.5 DDIM(eta) on the leading-spacing grid 981, 961, ..., 1 (eta = 1: DDPM variance)."""
    return replace(
        vp_ddim(flows.vp_alphas_cumprod(), flows.ddim_timesteps(steps), eta), name=f"sd15-ddim{steps}"
    )


def pcpo_weight_scale(steps: int = 50, weight: float = 4.5) -> float:
    """S = W / mean_t w_t of SD1.5's DDPM grid of ``steps`` steps: PCPO's loss weight W / S is the mean
    DDPM weight (8.705743 for 50 steps, the published 8.70575076181 to six digits; recompute it for
    another grid, zo_diffusion spec §2, §8)."""
    return weight / float(sd15_ddpm(steps).kernel.w.mean())


def sd15_pcpo(steps: int = 50, weight: float = 4.5, trained: int = 49) -> Grid:
    """PCPO's uw-sigma sampler on the SD1.5 grid; the baseline trains the first 49 of 50 transitions."""
    grid = vp_pcpo(flows.vp_alphas_cumprod(), flows.ddim_timesteps(steps), weight)
    return replace(grid.trained(trained), name=f"sd15-pcpo{steps}")


def sd35_flow_grpo(steps: int = 10, shift: float = 3.0, noise_level: float = 0.7, trained: int = 9) -> Grid:
    """SD3.5-M's Flow-GRPO SDE grid; TempFlow-GRPO and GRPO-Guard train the first 9 of 10 steps."""
    grid = flow_grpo_sde(flows.sd3_sigmas(steps, shift), noise_level)
    return replace(grid.trained(trained), name=f"sd35-sde{steps}")


def sd35_ode(steps: int = 20, shift: float = 3.0) -> Grid:
    """VGG-Flow's Euler ODE grid on SD3.5-M: all transitions are trained."""
    return replace(flow_ode(flows.sd3_sigmas(steps, shift)), name=f"sd35-ode{steps}")
