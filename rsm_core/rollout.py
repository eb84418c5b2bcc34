"""Trajectory collection on a discretised reverse process, with NFE counting.

A ``Chain`` is a grid of kernels plus the policy's native-output function; ``rollout`` runs it over a
range of steps. Noise can be shared by groups of contiguous rows (a branching tree): rows that have
shared every draw so far are the same state, so the model is evaluated once per group and the NFE
count is what a tree sampler really costs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from rsm_core.flows import TimePoint
from rsm_core.kernels import Kernel

NativeFn = Callable[[Tensor, int], Tensor]  # (states, chain step index) -> native output (eps or v)
ShareFn = Callable[[int], int]  # chain step index -> how many contiguous rows share that step's noise


@dataclass
class Chain:
    """kernels[i] moves a state from grid step i to step i + 1; native(x, i) is the rollout policy."""

    native: NativeFn
    kernels: Sequence[Kernel]
    nfe: int = field(default=0, compare=False)  # model evaluations, one per row per call

    def __len__(self) -> int:
        return len(self.kernels)

    def f(self, x: Tensor, i: int) -> Tensor:
        self.nfe += x.shape[0]
        return self.native(x, i)

    def point(self, i: int) -> TimePoint:
        """The time point of grid step i (i == len(self) is where the last kernel lands)."""
        return self.kernels[i].point if i < len(self) else self.kernels[-1].prev

    def x0_hat(self, x: Tensor, i: int) -> Tensor:
        """Tweedie's estimate at grid step i; a state that is already data is returned as is."""
        point = self.point(i)
        if bool(torch.all(point.sigma == 0)):
            return x
        return point.x0(x, self.f(x, i))

    def localized(self, stochastic_steps: set[int]) -> Chain:
        """The same chain with every step outside ``stochastic_steps`` replaced by its ODE step."""
        kernels = [k if i in stochastic_steps else k.deterministic() for i, k in enumerate(self.kernels)]
        return replace(self, kernels=kernels, nfe=0)


@dataclass
class Rollout:
    final: Tensor  # states at the stop step
    first_noise: Tensor  # the standard-normal draw of the first step (the Stein direction)
    path_kl: Tensor  # sum over the later stochastic steps of KL(policy || reference), per row


def rollout(
    chain: Chain,
    x: Tensor,
    start: int,
    stop: int,
    *,
    generator: torch.Generator | None = None,
    share: ShareFn | None = None,
    reference: NativeFn | None = None,
) -> Rollout:
    """Run ``chain`` from grid step ``start`` to ``stop`` (reparameterised: gradients flow through).

    ``share(i)`` rows in a row share step i's noise; the counts must not grow along the chain, so
    that groups are nested (a tree). ``reference`` accumulates the KL to another model over the
    stochastic steps after the first — the KL-to-go of the entropy-augmented return (theory §2.5).
    """
    if not 0 <= start <= stop <= len(chain):
        raise ValueError(f"need 0 <= start <= stop <= {len(chain)}, got start={start}, stop={stop}")
    rows = x.shape[0]
    path_kl = torch.zeros(rows, dtype=x.dtype, device=x.device)
    first_noise = torch.zeros_like(x)
    previous_share = rows
    for i in range(start, stop):
        group = share(i) if share else 1
        if rows % group or group > previous_share:
            raise ValueError(
                f"share({i}) = {group} must divide {rows} rows and not exceed the previous step's "
                f"{previous_share} (noise groups must be nested)"
            )
        previous_share = group
        kernel = chain.kernels[i]
        distinct = x[::group]
        f = chain.f(distinct, i)
        if kernel.stochastic:
            noise = torch.randn(distinct.shape, generator=generator, dtype=x.dtype, device=x.device)
        else:
            noise = torch.zeros_like(distinct)
        if reference is not None and i > start and kernel.stochastic:
            path_kl = path_kl + kernel.kl(f, reference(distinct, i)).repeat_interleave(group)
        x = kernel.sample(distinct, f, noise).repeat_interleave(group, dim=0)
        if i == start:
            first_noise = noise.repeat_interleave(group, dim=0)
    return Rollout(x, first_noise, path_kl)
