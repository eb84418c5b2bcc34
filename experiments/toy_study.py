"""The value-gradient-estimator study of the toy (toy spec §4-6): every panel as long-format rows.

All rollouts use the "ft" denoiser (it stands in for the optimal policy, as Prop. 3.1 requires) on
the DDIM grid 389, 379, ..., 9 with Markovian (eta = 1) noise; "base" enters only through the
entropy-augmented return. Each estimator simulates its particles once at the largest sample count
and every smaller count uses a prefix, so a curve costs one simulation.

Per-point error is sqrt(mean over the two coordinates of (estimate - target)^2), averaged over the
fixed points. Every row carries the error against the soft ground truth (``rmse``, the paper's
target) and against the exact hard-value gradient (``rmse_hard``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rsm_core import estimators as est
from rsm_core.kernels import ddim
from rsm_core.rollout import Chain, ShareFn
from rsm_core.toy.mixture import (
    EVAL_TIMESTEP,
    UnitMixture,
    hard_value_gradient,
    reward,
    reward_gradient,
    soft_ground_truth,
    toy_alphas_cumprod,
)

Denoise = Callable[[Tensor, int], Tensor]  # (x, integer timestep) -> eps
GRID_STRIDE = 10
STEPS = EVAL_TIMESTEP // GRID_STRIDE + 1  # 389 -> 379 -> ... -> 9 -> data: 39 steps


@dataclass(frozen=True)
class StudySettings:
    points: int = 20
    log2_samples: Sequence[int] = (4, 6, 8, 10, 12)
    zm_reference_log2: int = 14
    lookahead_ratios: Sequence[float] = (0.9, 0.8, 0.5)
    branch_patterns: Sequence[tuple[int, int]] = ((1, 1), (2, 2), (3, 2), (4, 2), (2, 4))
    # "exact": nu_1^2 / b_1 of the step taken (Prop. 3.1). "official": the released toy code's scales,
    # 0.98799 (the same formula for a one-index stride) on full rollouts and 1.0 on lookahead.
    scale_convention: Literal["exact", "official"] = "exact"
    soft_return: bool = True  # add the entropy-augmented zeroth-order curve (targets the soft GT)
    two_step_jump_to: int = 195  # F2: one deterministic DDIM jump 389 -> 195, then Tweedie
    max_rows: int = 1 << 17  # states simulated at once (bounds memory; results do not depend on it)
    seed: int = 0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    @property
    def max_samples(self) -> int:
        return 1 << max(self.log2_samples)


@dataclass
class Curve:
    panel: str
    curve: str
    samples: list[int]
    estimates: list[Tensor]  # (P, 2) per sample count
    nfe: list[float]  # model evaluations per estimate (a backward pass counts as one)
    reference: Tensor | None = None  # None: scored against the exact targets; else its own reference
    sample_free: bool = False


@dataclass
class Simulation:
    particles: est.ZerothOrderParticles
    nfe: float  # policy evaluations per particle, measured
    reference_nfe: float  # reference-model evaluations per particle (entropy-augmented return only)


class ToyStudy:
    """Runs the estimators of every panel against one set of fixed points."""

    def __init__(self, ft: Denoise, base: Denoise, settings: StudySettings) -> None:
        self.ft, self.base, self.s = ft, base, settings
        self.abar = toy_alphas_cumprod()
        self.timesteps = [EVAL_TIMESTEP - GRID_STRIDE * i for i in range(STEPS)]
        self.abar_t = float(self.abar[EVAL_TIMESTEP])
        self.x_t = self._fixed_points()
        self.soft_target = soft_ground_truth(self.x_t.double(), self.abar_t)
        self.hard_target = hard_value_gradient(self.x_t.double(), self.abar_t)

    # --- set-up ----------------------------------------------------------------------------------
    def _fixed_points(self) -> Tensor:
        generator = torch.Generator().manual_seed(self.s.seed)
        tilted = UnitMixture.reference().tilted(reward_gradient())
        x0 = tilted.sample(self.s.points, generator)
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        x_t = self.abar_t**0.5 * x0 + (1 - self.abar_t) ** 0.5 * z
        return x_t.to(self.s.dtype).to(self.s.device)

    def _abar(self, timestep: int) -> float:
        return 1.0 if timestep < 0 else float(self.abar[timestep])

    def chain(
        self, denoise: Denoise | None = None, timesteps: Sequence[int] | None = None, eta: float = 1.0
    ) -> Chain:
        """A DDIM chain over ``timesteps`` (default: the 39-step grid to the data)."""
        timesteps = list(timesteps or [*self.timesteps, -1])
        denoise = denoise or self.ft
        kernels = [
            ddim(self._abar(t), self._abar(t_next), eta)
            for t, t_next in zip(timesteps, timesteps[1:], strict=False)
        ]
        return Chain(lambda x, i: denoise(x, timesteps[i]), kernels)

    def _native(self, denoise: Denoise) -> Callable[[Tensor, int], Tensor]:
        return lambda x, i: denoise(x, self.timesteps[i])

    def _scale_full(self) -> Tensor:
        if self.s.scale_convention == "official":
            return est.lookahead_scale(ddim(self._abar(EVAL_TIMESTEP), self._abar(EVAL_TIMESTEP - 1)))
        return est.lookahead_scale(self.chain().kernels[0])

    def _scale_lookahead(self) -> Tensor:
        return torch.tensor(1.0) if self.s.scale_convention == "official" else self._scale_full()

    def _depth_for_ratio(self, ratio: float) -> int:
        """Steps until the first grid index at or below floor(389 ratio) (0.9 -> 4, 0.8 -> 8, 0.5 -> 20)."""
        terminal = int(EVAL_TIMESTEP * ratio)
        return next(i for i, t in enumerate(self.timesteps) if t <= terminal)

    # --- particle simulation in memory-bounded chunks -------------------------------------------
    def _chunks(self, width: int, granule: int) -> Iterator[tuple[slice, int]]:
        """(point slice, particle count) blocks of at most max_rows states, counts multiples of granule."""
        per_block = max(granule, (self.s.max_rows // granule) * granule)
        for p in range(self.s.points):
            for start in range(0, width, per_block):
                yield slice(p, p + 1), min(per_block, width - start)

    def _zeroth_order(
        self,
        *,
        depth: int | None,
        seed: int,
        share: ShareFn | None = None,
        granule: int = 1,
        chain: Chain | None = None,
        soft: bool = False,
        width: int | None = None,
    ) -> Simulation:
        """Particles (default: the largest sample count) and the measured model evaluations per particle."""
        chain = chain or self.chain()
        width = width or self.s.max_samples
        base = _Counted(self._native(self.base)) if soft else None
        generator = torch.Generator(device=self.s.device).manual_seed(seed)
        parts = [
            est.zeroth_order_particles(
                chain,
                self.x_t[pts],
                0,
                depth=depth,
                width=k,
                reward=reward,
                generator=generator,
                share=share,
                reference=base,
            )
            for pts, k in self._chunks(width, granule)
        ]
        particles = est.ZerothOrderParticles(
            rewards=_stack_points([q.rewards for q in parts], self.s.points),
            noise=_stack_points([q.noise for q in parts], self.s.points),
            path_kl=_stack_points([q.path_kl for q in parts], self.s.points),
            nu=parts[0].nu,
            scale=parts[0].scale,
        )
        rows = self.s.points * width
        return Simulation(particles, chain.nfe / rows, (base.rows if base else 0) / rows)

    def _zo_curve(
        self,
        panel: str,
        name: str,
        sim: Simulation,
        scale: Tensor,
        *,
        soft: bool = False,
        center: est.Centering = "mean",
        reference: Tensor | None = None,
    ) -> Curve:
        """A zeroth-order curve; the entropy-augmented one also pays the reference model's evaluations."""
        particles, rewards, nfe_per_particle = sim.particles, sim.particles.rewards, sim.nfe
        if soft:
            rewards = est.entropy_augmented_return(rewards, particles.path_kl, alpha=1.0)
            nfe_per_particle += sim.reference_nfe
        counts = self._sample_counts()
        noise = particles.noise.double()
        estimates = [
            est.zeroth_order_estimate(
                rewards[:, :n].double(), noise[:, :n], particles.nu, scale, center=center
            )
            for n in counts
        ]
        return Curve(panel, name, counts, estimates, [nfe_per_particle * n for n in counts], reference)

    def _fo_line(self, panel: str, name: str, chain: Chain, depth: int) -> Curve:
        """A sample-free first-order estimate, drawn as a horizontal line (nfe: forwards + one backward)."""
        if depth == 0:
            estimate = est.first_order_current(chain, self.x_t, 0, reward)
        else:
            estimate = est.first_order_lookahead_particles(
                chain, self.x_t, 0, depth=depth, width=1, reward=reward, wrt="state"
            )[:, 0]
        counts = self._sample_counts()
        nfe = chain.nfe / self.s.points + 1
        return Curve(
            panel, name, counts, [estimate.double()] * len(counts), [nfe] * len(counts), sample_free=True
        )

    def _fo_lookahead_curve(self, panel: str, name: str, depth: int, seed: int) -> Curve:
        """Pathwise lookahead gradients at x_t; nfe counts each backward pass as one more evaluation."""
        chain = self.chain()
        generator = torch.Generator(device=self.s.device).manual_seed(seed)
        grads = _stack_points(
            [
                est.first_order_lookahead_particles(
                    chain,
                    self.x_t[pts],
                    0,
                    depth=depth,
                    width=k,
                    reward=reward,
                    wrt="state",
                    generator=generator,
                )
                for pts, k in self._chunks(self.s.max_samples, 1)
            ],
            self.s.points,
        )
        per_particle = 2 * chain.nfe / (self.s.points * self.s.max_samples)
        counts = self._sample_counts()
        return Curve(
            panel,
            name,
            counts,
            [grads[:, :n].double().mean(dim=1) for n in counts],
            [per_particle * n for n in counts],
        )

    def _sample_counts(self) -> list[int]:
        return [1 << m for m in self.s.log2_samples]

    # --- panels ----------------------------------------------------------------------------------
    def panel_b(self, full: Simulation) -> list[Curve]:
        """One-step first order vs full-rollout zeroth order, with and without reward centring."""
        scale = self._scale_full()
        curves = [
            self._zo_curve("b", "ZO w/o control variate", full, scale, center="none"),
            self._zo_curve("b", "ZO w/ control variate", full, scale),
        ]
        if self.s.soft_return:
            curves.append(self._zo_curve("b", "ZO entropy-augmented return", full, scale, soft=True))
        jump = self.chain(timesteps=[EVAL_TIMESTEP, self.s.two_step_jump_to], eta=0.0)
        curves += [
            self._fo_line("b", "FO current state (DPS)", self.chain(), depth=0),
            self._fo_line("b", "FO SQDF 2-step ODE", jump, depth=1),
        ]
        return curves

    def panel_ci(self, full: Simulation) -> list[Curve]:
        """Lookahead depth: first order (pathwise) and zeroth order (Stein) at t_j/t_i in the ratios."""
        first, zeroth = "c-i first order", "c-i zeroth order"
        curves = [self._fo_line(first, "t_j/t_i = 1.00", self.chain(), depth=0)]
        depths = {ratio: self._depth_for_ratio(ratio) for ratio in self.s.lookahead_ratios}
        for ratio, depth in depths.items():
            seed = self.s.seed + 100 + depth
            curves.append(self._fo_lookahead_curve(first, f"t_j/t_i = {ratio:.2f}", depth, seed=seed))
        for ratio, depth in depths.items():
            sim = self._zeroth_order(depth=depth, seed=self.s.seed + 200 + depth)
            curves.append(self._zo_curve(zeroth, f"t_j/t_i = {ratio:.2f}", sim, self._scale_lookahead()))
        curves.append(self._zo_curve(zeroth, "t_j/t_i = 0.00", full, self._scale_full()))
        return curves

    def panel_cii(self, full: Simulation) -> list[Curve]:
        """Branching patterns (#split, #branch) under the same number of endpoints."""
        curves = []
        for splits, branch in self.s.branch_patterns:
            sim = full
            if branch > 1:
                seed = self.s.seed + 300 + 10 * splits + branch
                share = self._tree_share(splits, branch)
                sim = self._zeroth_order(depth=None, seed=seed, share=share, granule=branch**splits)
            curves.append(self._zo_curve("c-ii", f"({splits},{branch})", sim, self._scale_full()))
        return curves

    def _tree_share(self, splits: int, branch: int) -> ShareFn:
        """Rows sharing step i's noise: branch^u with u the branch points still ahead (toy spec §6.3)."""
        points = [EVAL_TIMESTEP - (EVAL_TIMESTEP // splits) * j for j in range(splits)]
        return lambda i: branch ** sum(self.timesteps[i] > p for p in points)

    def panel_ciii(self, full: Simulation) -> list[Curve]:
        """Stochasticity localisation: Markovian SDE vs one SDE step then ODE ("SDE & ODE mixed").

        The localised estimator targets a different control problem, so it is scored against its own
        estimate from an independent set of 2^zm_reference_log2 particles per point.
        """
        scale = self._scale_full()
        mixed = self._zeroth_order(depth=None, seed=self.s.seed + 400, chain=self.chain().localized({0}))
        reference = self._zeroth_order(
            depth=None,
            seed=self.s.seed + 401,
            chain=self.chain().localized({0}),
            width=1 << self.s.zm_reference_log2,
        ).particles
        own = est.zeroth_order_estimate(
            reference.rewards.double(), reference.noise.double(), reference.nu, scale
        )
        return [
            self._zo_curve("c-iii", "SDE", full, scale),
            self._zo_curve("c-iii", "SDE & ODE mixed", mixed, scale, reference=own),
        ]

    def run(self, progress: Callable[[str], None] = lambda _: None) -> list[Curve]:
        """Every panel's curves; ``progress`` is told the name of each stage as it starts."""
        progress("full rollout")
        full = self._zeroth_order(depth=None, seed=self.s.seed + 1, soft=self.s.soft_return)
        curves = []
        for name, panel in (
            ("panel b", self.panel_b),
            ("panel c-i", self.panel_ci),
            ("panel c-ii", self.panel_cii),
            ("panel c-iii", self.panel_ciii),
        ):
            progress(name)
            curves += panel(full)
        return curves

    # --- scoring ---------------------------------------------------------------------------------
    def rows(self, curves: Sequence[Curve]) -> list[dict]:
        """Long format: one row per plotted point, with errors against both exact targets."""
        rows = []
        for c in curves:
            for n, estimate, nfe in zip(c.samples, c.estimates, c.nfe, strict=True):
                row = {
                    "panel": c.panel,
                    "curve": c.curve,
                    "samples": n,
                    "log2_samples": n.bit_length() - 1,
                    "nfe": nfe,
                    "sample_free": c.sample_free,
                }
                if c.reference is None:
                    row |= {
                        "target": "soft",
                        "rmse": point_rmse(estimate, self.soft_target),
                        "rmse_hard": point_rmse(estimate, self.hard_target),
                    }
                else:
                    row |= {
                        "target": "own-reference",
                        "rmse": point_rmse(estimate, c.reference),
                        "rmse_hard": float("nan"),
                    }
                rows.append(row)
        return rows


def point_rmse(estimate: Tensor, target: Tensor) -> float:
    """Mean over points of sqrt(mean over coordinates of the squared error) (the official toy metric)."""
    return float(((estimate.double() - target.double()) ** 2).mean(dim=1).sqrt().mean())


def _stack_points(parts: Sequence[Tensor], points: int) -> Tensor:
    """Blocks ordered point by point (each (1, k, ...)) -> (points, K, ...)."""
    per_point = len(parts) // points
    return torch.cat(
        [torch.cat(parts[p * per_point : (p + 1) * per_point], dim=1) for p in range(points)], dim=0
    )


class _Counted:
    """Wraps a native function to count the rows it evaluates (the reference model's NFE)."""

    def __init__(self, native: Callable[[Tensor, int], Tensor]) -> None:
        self.native, self.rows = native, 0

    def __call__(self, x: Tensor, i: int) -> Tensor:
        self.rows += x.shape[0]
        return self.native(x, i)
