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

from rsm_core import flows
from rsm_core.backbones.text import Cond
from rsm_core.flows import TimePoint

FlowKind = Literal["rf-v", "vp-eps"]


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

    def grid(self, steps: int) -> Tensor:
        """The sampling grid: shifted sigmas 1 -> 0 (steps + 1 points) or DDIM timesteps 981 ... 1."""
        if self.kind == "rf-v":
            return flows.sd3_sigmas(steps, self.shift, self.num_train_timesteps)
        return flows.ddim_timesteps(steps, self.num_train_timesteps)


class Backbone:
    """Shared machinery; a concrete backbone sets ``model``, ``flow``, ``lora_targets`` and implements
    ``_encode``, ``_forward`` and ``decode``."""

    model: nn.Module
    flow: FlowSpec
    lora_targets: tuple[str, ...]

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
