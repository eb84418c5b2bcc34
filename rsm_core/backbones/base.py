"""One backbone interface for the tiny world and for SD3.5-M / SD1.5 (DESIGN.md "Interfaces").

A backbone turns prompts into conditioning (cached), predicts its native output (eps or velocity)
with or without classifier-free guidance, with or without its LoRA adapter (adapter off = the frozen
reference), decodes latents to images in [0, 1], and tells rsm_core which flow it lives on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from rsm_core import flows, kernels
from rsm_core.backbones.text import Cond
from rsm_core.flows import TimePoint
from rsm_core.kernels import Kernel

FlowKind = Literal["rf-v", "vp-eps"]
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # the paper's LoRA targets (SD1.5, SD3.5, tiny)


@dataclass(frozen=True)
class FlowSpec:
    """Rectified flow with velocity prediction (t in [0, 1], model timestep 1000 t) or a VP flow with
    eps prediction (t = DDPM index into ``alphas_cumprod``)."""

    kind: FlowKind
    shift: float = 3.0  # rf-v: the sampling grid's time shift
    alphas_cumprod: Tensor | None = field(default=None, repr=False)  # vp-eps
    num_train_timesteps: int = 1000

    def point(self, t: Tensor) -> TimePoint:
        if self.kind == "rf-v":
            return TimePoint.rf(t)
        return TimePoint.vp(self.alphas_cumprod[t.long()])

    def model_timestep(self, t: Tensor) -> Tensor:
        return t * self.num_train_timesteps if self.kind == "rf-v" else t

    def training_example(
        self, x0: Tensor, noise: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, t, regression target) for denoising pretraining: rectified flow with logit-normal t
        (SD3's choice) and target v = noise - x0, or a uniform DDPM index with target eps."""
        b = x0.shape[0]
        if self.kind == "rf-v":
            t = torch.sigmoid(torch.randn(b, generator=generator)).to(x0.dtype)
            tt = t.view(-1, *([1] * (x0.ndim - 1)))
            return (1 - tt) * x0 + tt * noise, t, noise - x0
        t = torch.randint(0, self.num_train_timesteps, (b,), generator=generator)
        abar = self.alphas_cumprod[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t, noise

    def ode_kernels(self, steps: int) -> list[Kernel]:
        """The deterministic sampler's steps on this flow's grid (Euler for rf-v, DDIM eta = 0 for vp)."""
        grid = self.grid(steps)
        if self.kind == "rf-v":
            return [kernels.flow_ode(grid[i], grid[i + 1]) for i in range(steps)]
        abar, abar_prev = flows.ddim_alpha_pairs(self.alphas_cumprod.double(), grid)
        return [kernels.ddim(abar[i], abar_prev[i], eta=0.0) for i in range(steps)]

    def sde_kernels(self, steps: int, noise_level: float = 0.7) -> list[Kernel]:
        """The stochastic sampler's steps: Flow-GRPO's SDE (rf-v) or DDPM, i.e. DDIM eta = 1 (vp)."""
        grid = self.grid(steps)
        if self.kind == "rf-v":
            t_max = float(grid[1])
            return [kernels.flow_grpo_sde(grid[i], grid[i + 1], t_max, noise_level) for i in range(steps)]
        abar, abar_prev = flows.ddim_alpha_pairs(self.alphas_cumprod.double(), grid)
        return [kernels.ddim(abar[i], abar_prev[i], eta=1.0) for i in range(steps)]

    def grid(self, steps: int) -> Tensor:
        """The sampling grid: shifted sigmas 1 -> 0 (steps + 1 points) or DDIM timesteps 981 ... 1."""
        if self.kind == "rf-v":
            return flows.sd3_sigmas(steps, self.shift, self.num_train_timesteps)
        return flows.ddim_timesteps(steps, self.num_train_timesteps)


class Backbone:
    """Shared machinery; a concrete backbone sets ``model``, ``flow`` and ``latent_shape`` (and
    ``lora_targets`` if not the attention projections) and implements _encode, _forward, decode."""

    model: nn.Module
    flow: FlowSpec
    lora_targets: tuple[str, ...] = ATTENTION_PROJECTIONS

    def __init__(self) -> None:
        self._cache: dict[str, Cond] = {}

    # --- conditioning ---------------------------------------------------------------------------
    def _encode(self, prompts: Sequence[str]) -> Cond:
        raise NotImplementedError

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Frozen-text-encoder conditioning, computed once per distinct prompt."""
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            with torch.no_grad():
                fresh = self._encode(missing)
            for i, prompt in enumerate(missing):
                self._cache[prompt] = fresh[i : i + 1]
        return Cond.cat([self._cache[p] for p in prompts])

    # --- prediction -----------------------------------------------------------------------------
    def _forward(self, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        raise NotImplementedError

    def native(
        self,
        x: Tensor,
        t: Tensor | float,
        cond: Cond,
        *,
        cfg: float | None = None,
        adapter: bool = True,
        detach_uncond: bool = False,
    ) -> Tensor:
        """eps or v at (x, t); cfg = guidance scale (None: conditional only); adapter=False: reference.

        detach_uncond stops the gradient through the unconditional branch (VGG-Flow's training CFG).
        """
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        timestep = self.flow.model_timestep(t)
        with self.adapters(adapter):
            if cfg is None:
                return self._forward(x, timestep, cond)
            uncond = self.encode([""] * x.shape[0])
            both = self._forward(torch.cat([x, x]), torch.cat([timestep, timestep]), Cond.cat([uncond, cond]))
            f_uncond, f_cond = both.chunk(2)
            if detach_uncond:
                f_uncond = f_uncond.detach()
            return f_uncond + cfg * (f_cond - f_uncond)

    # --- LoRA -----------------------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, init: str | bool = "gaussian") -> None:
        from peft import LoraConfig

        config = LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(self.lora_targets)
        )
        self.model.add_adapter(config)

    @property
    def has_adapter(self) -> bool:
        return bool(getattr(self.model, "_hf_peft_config_loaded", False))

    @contextmanager
    def adapters(self, enabled: bool) -> Iterator[None]:
        """Run with the LoRA adapter on (policy) or off (the frozen reference)."""
        if enabled or not self.has_adapter:
            yield
            return
        self.model.disable_adapters()
        try:
            yield
        finally:
            self.model.enable_adapters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # --- images ---------------------------------------------------------------------------------
    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    latent_shape: tuple[int, ...]

    @torch.no_grad()
    def sample_ode(
        self, prompts: Sequence[str], steps: int, cfg: float | None, generator: torch.Generator
    ) -> Tensor:
        """Deterministic samples (latents) from the flow's ODE sampler, starting at N(0, I) noise."""
        x = torch.randn(len(prompts), *self.latent_shape, generator=generator)
        cond = self.encode(prompts)
        grid = self.grid_times(steps)
        for i, kernel in enumerate(self.flow.ode_kernels(steps)):
            x = kernel.mean(x.double(), self.native(x, grid[i], cond, cfg=cfg).double()).float()
        return x

    def grid_times(self, steps: int) -> Tensor:
        """The model-time value of each sampler step (t in [0, 1], or the DDPM index)."""
        return self.flow.grid(steps)[:steps].float()
