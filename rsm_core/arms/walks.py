"""Whole trajectories of a guided policy on one grid, and the evaluation that walks them.

Two arm kinds roll out plain trajectories that keep every state (the first-order arm's ODE / DDPM
sampler, the zeroth-order trajectory arm's uw-sigma SDE), and three evaluate on such a walk (the
reward of its last state, and a divergence to the frozen reference along it). Both live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rsm_core.grids import Grid
from rsm_core.interfaces import Backbone, Reward
from rsm_core.scoring import decode_and_score
from rsm_core.transitions import Transitions

NoiseFn = Callable[[torch.Size], Tensor]  # shape -> standard-normal draws
# (step i, x_i, policy output at x_i, conditioning) -> None; sees every state before step i is taken
ObserveFn = Callable[[int, Tensor, Tensor, object], None]
# (step i, x_i, policy output, reference output) -> per-sample divergence of step i, shape (B,)
DivergenceFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Walk:
    states: Tensor  # (B, N + 1, *D)
    native: Tensor  # (B, N, *D) the sampling policy's output at each state
    noise: Tensor | None  # (B, N, *D) the SDE draws (None on an ODE grid)


@torch.no_grad()
def walk(
    backbone: Backbone,
    grid: Grid,
    times: Tensor,
    prompts: Sequence[str],
    start: Tensor,
    cfg: float | None,
    draw: NoiseFn,
    observe: ObserveFn | None = None,
) -> Walk:
    """The policy's trajectory from ``start`` over every step of ``grid`` (``times`` its model times);
    ``draw(shape)`` gives each stochastic step's noise. Kernel arithmetic in float64, states float32."""
    cond = backbone.encode(prompts)
    states, natives, noises = [start], [], []
    for i in range(len(grid)):
        kernel, x = grid[i], states[-1]
        f = backbone.native(x, times[i], cond, cfg=cfg)
        if observe is not None:
            observe(i, x, f, cond)
        natives.append(f)
        if kernel.stochastic:
            noises.append(draw(x.shape))
            states.append(kernel.sample(x.double(), f.double(), noises[-1].double()).float())
        else:
            states.append(kernel.mean(x.double(), f.double()).float())
    noise = torch.stack(noises, 1) if noises else None
    return Walk(torch.stack(states, 1), torch.stack(natives, 1), noise)


@dataclass(frozen=True)
class WalkEvaluation:
    """A fixed test set evaluated on the policy's own walks (first-order arms, PCPO's plain sampler)."""

    backbone: Backbone
    grid: Grid
    times: Tensor
    cfg: float | None
    rewards: Mapping[str, Reward]  # "reward" first, then any extra
    divergences: Mapping[str, DivergenceFn]  # each averaged over the walk's steps
    batch: int  # images per sampling call
    decode_chunk: int
    seed: int | None  # image j's noise from its own generator seeded seed + j; None: ``generator``
    generator: torch.Generator | None = None

    @classmethod
    def sde(
        cls,
        backbone: Backbone,
        grid: Grid,
        cfg: float | None,
        rewards: Mapping[str, Reward],
        proxy: Callable[[Tensor, Transitions], Tensor],
        batch: int,
        decode_chunk: int,
        seed: int | None,
        generator: torch.Generator | None = None,
    ) -> WalkEvaluation:
        """The SD1.5 zeroth-order trainers' evaluation on a stochastic ``grid``: the exact KL and the
        method's ``proxy`` along each walk (``kl_divergences``)."""
        times = backbone.grid_times(len(grid))
        divergences = kl_divergences(grid, proxy)
        return cls(backbone, grid, times, cfg, rewards, divergences, batch, decode_chunk, seed, generator)

    def __call__(self, metas: Sequence[dict], part: int, parts: int) -> dict[str, Tensor]:
        """Per test image of this ``part`` of ``parts`` of ``metas``: every reward of the walk's last
        state and every divergence. Fixed noise comes per image, so the values do not depend on the
        split."""
        mine = range(part * len(metas) // parts, (part + 1) * len(metas) // parts)
        values: dict[str, list[Tensor]] = {name: [] for name in [*self.rewards, *self.divergences]}
        for first in range(mine.start, mine.stop, self.batch):
            images = range(first, min(first + self.batch, mine.stop))
            for name, value in self._batch([metas[i] for i in images], images).items():
                values[name].append(value)
        return {
            name: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64) for name, v in values.items()
        }

    def _batch(self, metas: list[dict], images: range) -> dict[str, Tensor]:
        prompts = [m["prompt"] for m in metas]
        if self.seed is not None:
            generators = [torch.Generator().manual_seed(self.seed + i) for i in images]
        else:
            generators = [self.generator] * len(images)

        def draw(shape: torch.Size) -> Tensor:
            return torch.stack([torch.randn(shape[1:], generator=g) for g in generators])

        totals = {name: torch.zeros(len(prompts), dtype=torch.float64) for name in self.divergences}

        def observe(i: int, x: Tensor, f: Tensor, cond) -> None:
            f_ref = self.backbone.native(x, self.times[i], cond, cfg=self.cfg, adapter=None)
            for name, divergence in self.divergences.items():
                totals[name] = totals[name] + divergence(i, x, f, f_ref).double() / len(self.grid)

        start = draw(torch.Size((len(prompts), *self.backbone.latent_shape)))
        path = walk(self.backbone, self.grid, self.times, prompts, start, self.cfg, draw, observe)
        scores = decode_and_score(
            self.backbone, self.rewards, path.states[:, -1], prompts, metas, self.decode_chunk
        )
        return {name: value.double() for name, value in scores.items()} | totals


def kl_divergences(grid: Grid, proxy: Callable[[Tensor, Transitions], Tensor]) -> dict[str, DivergenceFn]:
    """What an SDE evaluation logs along the walk: ``kl``, the exact per-element KL of the policy's
    kernel to the reference's at each step, and ``approx_kl``, the method's own per-row proxy (PCPO's
    1/2 mean_d (4.5 (eps - eps_ref))^2, which is not a KL: spec §5)."""

    def exact(i: int, x: Tensor, f: Tensor, f_ref: Tensor) -> Tensor:
        return grid[i].kl(f.double(), f_ref.double(), reduction="mean")

    def approximate(i: int, x: Tensor, f: Tensor, f_ref: Tensor) -> Tensor:
        return proxy(f, Transitions(kernel=grid[i], x=x, f_old=f, f_ref=f_ref))

    return {"kl": exact, "approx_kl": approximate}
