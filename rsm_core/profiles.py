"""Branching profiles: how many one-step SDE children k_i a branching rollout spawns at each step.

The named profiles are the published ones on SD3.5's 10-step grid (zo_flow_tempflow spec §6; the
trailing 10th config entry is never used, so a profile has one entry per trained step 0..8). All
Figure 3 profiles keep sum k = 54, i.e. the same rows and reward calls per parent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Profile:
    name: str
    k: tuple[int, ...]  # children per trained step

    def __post_init__(self) -> None:
        if any(k < 0 for k in self.k) or sum(self.k) == 0:
            raise ValueError(
                f"profile {self.name!r} needs non-negative branch counts with a positive sum, got {self.k}"
            )

    @property
    def total(self) -> int:
        """Rows (and reward calls) per parent trajectory."""
        return sum(self.k)

    @property
    def active(self) -> list[int]:
        return [i for i, k in enumerate(self.k) if k > 0]

    @property
    def k_avg(self) -> float:
        return self.total / len(self.active)

    def branch_weight(self, step: int) -> float:
        """k_avg / k_i: every active step carries the same total loss mass whatever its k_i."""
        return self.k_avg / self.k[step]

    def nfe_per_parent(self, sampler_steps: int) -> int:
        """Guided model calls per parent of our sampler: the ODE trunk (one call per profile entry)
        plus each child's ODE tail; a child of step i reuses the trunk's output at x_i for its SDE
        step, then needs N - 1 - i calls."""
        return len(self.k) + sum(k * (sampler_steps - 1 - i) for i, k in enumerate(self.k))

    def published_nfe_per_parent(
        self, sampler_steps: int, parents: int = 1, chunk: int | None = None
    ) -> float:
        """What the published sampler spends per parent (zo_flow_tempflow spec §5): the trunk (steps
        0..N-2), then per branching step k_i recomputed trunk outputs for each of ``parents`` parents,
        then the ODE tails stepped together per grid point; pass 2a and 2b batches are padded up to
        whole chunks of ``chunk`` rows (None: no padding, the spec table's count)."""

        def padded(rows: int) -> int:
            return rows if chunk is None else -(-rows // chunk) * chunk

        branch = sum(padded(parents * k) for k in self.k if k)
        tails = sum(padded(parents * sum(self.k[:j])) for j in range(1, sampler_steps) if sum(self.k[:j]))
        return (sampler_steps - 1) + (branch + tails) / parents


PUBLISHED = {
    "base": (6, 6, 6, 6, 6, 6, 6, 6, 6),  # the TempFlow-GRPO baseline [inferred, strongly]
    "base2": (7, 7, 7, 7, 7, 7, 6, 6, 0),  # "Uniform Reallocation" [inferred]
    "highsnr": (3, 3, 4, 5, 6, 7, 7, 8, 11),  # variance-aware, step 8 still on (not a Fig. 3 curve)
    "highsnr2": (4, 5, 5, 6, 7, 8, 9, 10, 0),  # "Equal Variance Reallocation" [inferred]
    "lowsnr": (6, 6, 8, 10, 11, 13, 0, 0, 0),
    "lowsnr2": (6, 6, 8, 10, 0, 0, 0, 0, 0),  # the GenEval redesign (published command)
}
AUTO_EQUAL_VARIANCE = "auto-equal-variance"


def named(name: str) -> Profile:
    if name not in PUBLISHED:
        choices = ", ".join([*PUBLISHED, AUTO_EQUAL_VARIANCE])
        raise ValueError(f"unknown branching profile {name!r}; choose one of {choices}")
    return Profile(name, PUBLISHED[name])


def proportional(weights: Sequence[float], total: int, name: str) -> Profile:
    """k_i proportional to ``weights`` (zeros stay off), rounded to integers summing to ``total``.

    Largest-remainder rounding, with every step of positive weight keeping at least one child.
    """
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"allocation weights must be finite, non-negative and not all zero, got {list(w)}")
    on = w > 0
    if total < on.sum():
        raise ValueError(f"a total of {total} children cannot give each of {int(on.sum())} active steps one")
    exact = total * w / w.sum()
    k = np.where(on, np.maximum(np.floor(exact), 1), 0).astype(int)
    while k.sum() != total:
        remainder = np.where(on, exact - k, -np.inf)
        if k.sum() < total:
            k[int(np.argmax(remainder))] += 1
        else:
            remainder = np.where(k > 1, remainder, np.inf)
            k[int(np.argmin(remainder))] -= 1
    return Profile(name, tuple(int(v) for v in k))


def equal_variance(step_std: Sequence[float], signal_std: Sequence[float], total: int) -> Profile:
    """The ``auto-equal-variance`` profile: k_i proportional to the measured noise of step i's guidance.

    A child of step i contributes A eps / s_i to the Stein guidance estimate, so the spread of one
    child's contribution is (reward spread at step i) / s_i. Allocating k_i in proportion to it
    minimises the summed estimator variance sum_i var_i / k_i at fixed sum k (Neyman allocation);
    with a reward spread that is the same at every step it reduces to k_i ~ 1 / s_i, the rule behind
    the published highsnr profiles (spec §6). Steps whose measured spread is zero are switched off.
    """
    s = np.asarray(step_std, dtype=np.float64)
    spread = np.asarray(signal_std, dtype=np.float64)
    if s.shape != spread.shape or (s <= 0).any():
        raise ValueError("need one positive step std and one reward spread per trained step")
    return proportional(spread / s, total, AUTO_EQUAL_VARIANCE)


SPARSE = "sparse"  # the SD1.5 redesign's schedule: k children at every stride-th step (zo_diffusion §4.1)


def strided(steps: int, stride: int, k: int) -> Profile:
    """k children at steps 0, stride, 2 stride, ... of ``steps`` trained steps, none elsewhere (the
    published SD1.5 redesign: k = 4 at steps 0, 10, 20, 30, 40 of 49)."""
    if steps < 1 or stride < 1 or k < 1:
        raise ValueError(f"a strided profile needs steps, stride and k >= 1, got {steps}, {stride}, {k}")
    return Profile(SPARSE, tuple(k if i % stride == 0 else 0 for i in range(steps)))
