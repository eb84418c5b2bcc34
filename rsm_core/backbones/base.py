"""The shared implementation of ``rsm_core.interfaces.Backbone`` (tiny world, SD3.5-M, SD1.5).

A backbone turns prompts into conditioning (cached), predicts its native output (eps or velocity)
with or without classifier-free guidance, through one of its named LoRA adapters (the policy, or a
second network such as a value head) or with every adapter off (the frozen reference), decodes
latents to images in [0, 1], and tells rsm_core which flow it lives on and which grids it samples.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from rsm_core import flows, grids
from rsm_core.backbones.text import Cond
from rsm_core.flows import TimePoint
from rsm_core.grids import Grid

FlowKind = Literal["rf-v", "vp-eps"]
# every attention projection (self and cross): the published SD1.5 targets, VGG-Flow's on SD3.5-M, and
# the tiny world's (spec: map the targets to the tiny model's q/k/v/out)
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


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

    def ode_grid(self, steps: int) -> Grid:
        """The deterministic sampler: Euler (rf-v) or DDIM eta = 0 (vp) on this flow's grid."""
        if self.kind == "rf-v":
            return grids.flow_ode(self.grid(steps))
        return grids.vp_ddim(self.alphas_cumprod, self.grid(steps), eta=0.0)

    def sde_grid(self, steps: int, noise_level: float = 0.7, uw_sigma: float | None = None) -> Grid:
        """The stochastic sampler: Flow-GRPO's SDE (rf-v) or DDPM, i.e. DDIM eta = 1 (vp); on vp,
        ``uw_sigma`` = W takes PCPO's uw-sigma std with that constant instead (zo_diffusion spec §2)."""
        if self.kind == "rf-v":
            if uw_sigma is not None:
                raise ValueError("the uw-sigma std is PCPO's for eps-prediction (vp) models, not flows")
            return grids.flow_grpo_sde(self.grid(steps), noise_level)
        if uw_sigma is not None:
            return grids.vp_pcpo(self.alphas_cumprod, self.grid(steps), uw_sigma)
        return grids.vp_ddim(self.alphas_cumprod, self.grid(steps), eta=1.0)

    def grid(self, steps: int) -> Tensor:
        """The sampling grid: shifted sigmas 1 -> 0 (steps + 1 points) or DDIM timesteps 981 ... 1."""
        if self.kind == "rf-v":
            return flows.sd3_sigmas(steps, self.shift, self.num_train_timesteps)
        return flows.ddim_timesteps(steps, self.num_train_timesteps)


POLICY = "policy"  # the LoRA adapter a method trains; more adapters (a value network) get other names
_COPY = ".modules_to_save."  # peft's name part of an adapter's trainable module copies


class BackboneBase:
    """Shared machinery of ``rsm_core.interfaces.Backbone``; a concrete backbone sets ``model``,
    ``flow`` and ``latent_shape`` (and ``lora_targets`` if not the attention projections) and
    implements _encode, _forward, decode."""

    model: nn.Module
    flow: FlowSpec
    lora_targets: tuple[str, ...] = ATTENTION_PROJECTIONS
    output_layer: str = "proj_out"  # the network's last layer (SD3 transformers; UNets: conv_out)
    # prompts whose conditioning stays in memory (0: all). A paper backbone bounds it: 2,048 test
    # prompts of SD3.5-M conditioning are gigabytes; the rest is on disk.
    memory_cache_prompts: int = 0
    autocast_dtype: torch.dtype | None = None  # the forward's autocast precision (None: full precision)

    def __init__(self) -> None:
        self._cache: OrderedDict[str, Cond] = OrderedDict()
        self._current_adapter: str | None = None  # the adapter ``native`` runs by default

    # --- conditioning ---------------------------------------------------------------------------
    def _encode(self, prompts: Sequence[str]) -> Cond:
        raise NotImplementedError

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Frozen-text-encoder conditioning, computed once per distinct prompt and kept in memory
        (the ``memory_cache_prompts`` most recently used, if bounded)."""
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            with torch.no_grad():
                fresh = self._encode(missing)
            for i, prompt in enumerate(missing):
                self._cache[prompt] = fresh[i : i + 1]
        cond = Cond.cat([self._cache[p] for p in prompts])
        for prompt in dict.fromkeys(prompts):
            self._cache.move_to_end(prompt)
        while self.memory_cache_prompts and len(self._cache) > self.memory_cache_prompts:
            self._cache.popitem(last=False)
        return cond

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
        adapter: str | None = POLICY,
        detach_uncond: bool = False,
        guidance_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """eps or v at (x, t); cfg = guidance scale (None: conditional only); ``adapter`` names the
        LoRA adapter to run (None: every adapter off, i.e. the frozen reference).

        detach_uncond stops the gradient through the unconditional branch (VGG-Flow's training CFG).
        guidance_dtype: combine the two halves in this dtype (the published rollout casts the raw
        outputs to its fp16 embedding dtype before CFG, so its guided velocity is fp16-rounded).
        """
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        timestep = self.flow.model_timestep(t)
        with self.adapter(adapter):
            if cfg is None:
                return self._forward(x, timestep, cond)
            uncond = self.encode([""] * x.shape[0])
            both = self._forward(torch.cat([x, x]), torch.cat([timestep, timestep]), Cond.cat([uncond, cond]))
            f_uncond, f_cond = both.to(guidance_dtype or both.dtype).chunk(2)
            if detach_uncond:
                f_uncond = f_uncond.detach()
            return (f_uncond + cfg * (f_cond - f_uncond)).to(both.dtype)

    # --- LoRA adapters --------------------------------------------------------------------------
    def add_lora(
        self,
        rank: int,
        alpha: float,
        init: str | bool = "gaussian",
        name: str = POLICY,
        targets: Sequence[str] = (),
        trainable_copies: Sequence[str] = (),
    ) -> None:
        """A new trainable LoRA adapter on ``targets`` (module-name suffixes; empty: the backbone's
        published ``lora_targets``), in fp32 whatever the frozen weights' dtype; the base weights are
        frozen, every adapter stays trainable, and the policy adapter stays the one ``native`` runs by
        default. ``trainable_copies``: modules the adapter replaces by a fully trainable copy of its
        own (peft's modules_to_save), e.g. a value network's output layer."""
        from peft import LoraConfig

        if name in self.adapter_names:
            raise ValueError(f"the backbone already has a LoRA adapter named {name!r}")
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights=init,
            target_modules=list(targets or self.lora_targets),
            modules_to_save=list(trainable_copies) or None,
        )
        with self._keeping_trainable(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # a second adapter
            self.model.add_adapter(config, adapter_name=name)
        for parameter_name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in parameter_name or _COPY in parameter_name)
        with torch.no_grad():
            for p in self.adapter_parameters(name):
                p.data = p.data.float()
        self._switch(POLICY if POLICY in self.adapter_names else name)

    @property
    def adapter_names(self) -> list[str]:
        model = getattr(self, "model", None)
        if not getattr(model, "_hf_peft_config_loaded", False):
            return []
        return list(self.model.peft_config)

    def adapter_parameters(self, name: str = POLICY) -> list[nn.Parameter]:
        """The LoRA weights of one adapter and its trainable copies, in a fixed order (checkpoints index
        them)."""
        if name not in self.adapter_names:
            raise KeyError(f"no LoRA adapter named {name!r}; the backbone has {self.adapter_names or 'none'}")
        lora, copy = f".{name}.", f"{_COPY}{name}."
        return [p for n, p in self.model.named_parameters() if ("lora_" in n and lora in n) or copy in n]

    def trainable_copy(self, module: str, adapter: str) -> nn.Module:
        """The adapter's own copy of ``module`` (see ``add_lora``'s trainable_copies)."""
        wrapper = self.model.get_submodule(module)
        copies = getattr(wrapper, "modules_to_save", {})
        if adapter not in copies:
            raise KeyError(f"adapter {adapter!r} has no trainable copy of {module!r}")
        return copies[adapter]

    @contextmanager
    def _keeping_trainable(self) -> Iterator[None]:
        """peft freezes every adapter but the active one when it switches; every adapter the harness
        added stays trainable (an arm may train two at once), so the flags are restored."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def _switch(self, name: str | None) -> None:
        with self._keeping_trainable():
            if name is None:
                self.model.disable_adapters()
            else:
                self.model.set_adapter(name)
                self.model.enable_adapters()
            self._switch_copies(name)
        self._current_adapter = name

    def _switch_copies(self, name: str | None) -> None:
        """peft leaves a trainable module copy on whenever one adapter has it (its wrapper keeps its
        adapter active for other adapters and ignores disable_adapters): run the copy for its own
        adapter only, the original module otherwise."""
        from peft.utils.other import ModulesToSaveWrapper

        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                own = name is not None and name in module.modules_to_save
                if own:
                    module.set_adapter(name)
                module.enable_adapters(own)

    @contextmanager
    def adapter(self, name: str | None) -> Iterator[None]:
        """Run with one LoRA adapter on (``name``) or all off (None: the frozen reference)."""
        known = self.adapter_names
        if name is not None and name not in known and not (name == POLICY and not known):
            raise KeyError(f"no LoRA adapter named {name!r}; the backbone has {known or 'none'}")
        if not known or name == self._current_adapter:  # without LoRA the base model is the policy
            yield
            return
        previous = self._current_adapter
        self._switch(name)
        try:
            yield
        finally:
            self._switch(previous)

    # --- images ---------------------------------------------------------------------------------
    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    latent_shape: tuple[int, ...]

    # --- deterministic sampling -----------------------------------------------------------------
    @torch.no_grad()
    def sample_ode(
        self,
        prompts: Sequence[str],
        steps: int,
        cfg: float | None,
        generator: torch.Generator | None = None,
        *,
        start: Tensor | None = None,
        observe: Callable[[int, Tensor, Tensor], None] | None = None,
        until: int | None = None,
        guidance_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Latents from the flow's ODE sampler, from ``start`` or from N(0, I) noise of ``generator``.

        ``observe(i, x_i, f_i)`` sees each state and the policy's output before step i is taken (the
        evaluation's KL along the path); ``until`` stops after that many of the ``steps`` steps.
        Kernel arithmetic runs in float64, states are float32; ``guidance_dtype`` as in ``native``.
        """
        if start is None:
            start = torch.randn(len(prompts), *self.latent_shape, generator=generator)
        cond, times, x = self.encode(prompts), self.grid_times(steps), start
        grid = self.flow.ode_grid(steps)
        for i in range(steps if until is None else until):
            kernel = grid[i]
            f = self.native(x, times[i], cond, cfg=cfg, guidance_dtype=guidance_dtype)
            if observe is not None:
                observe(i, x, f)
            x = kernel.mean(x.double(), f.double()).float()
        return x

    def grid_times(self, steps: int) -> Tensor:
        """The model-time value of each sampler step (t in [0, 1], or the DDPM index)."""
        return self.flow.grid(steps)[:steps].float()
