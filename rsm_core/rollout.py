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


# ------------------------------------------------------------------------------------------------
# Branching rollout (TempFlow-GRPO's sampler, zo_flow_tempflow spec §5)
# ------------------------------------------------------------------------------------------------

GuidedFn = Callable[[Tensor, int, Tensor], Tensor]  # (states, grid step, parent index per row) -> native


@dataclass
class BranchRollout:
    """Parents' ODE trunks and one row per child: the child left trunk state x_i of parent p with one
    SDE step (noise eps) and followed the ODE to the end (``final``)."""

    trunk: Tensor  # (P, L + 1, *D): x_0 .. x_L of each parent's ODE trajectory (L profile entries)
    trunk_native: Tensor  # (P, L, *D): the policy's output at trunk steps 0 .. L - 1
    parent: Tensor  # (R,) parent index of each child row
    step: Tensor  # (R,) the step i it branched at
    noise: Tensor  # (R, *D) its SDE draw
    final: Tensor  # (R, *D) its terminal state
    nfe: int  # guided model calls spent


def _evaluate(native: GuidedFn, x: Tensor, step: int, parents: Tensor, chunk: int) -> Tensor:
    return torch.cat(
        [native(x[s : s + chunk], step, parents[s : s + chunk]) for s in range(0, x.shape[0], chunk)]
    )


@torch.no_grad()
def branching_rollout(
    native: GuidedFn,
    ode: Sequence[Kernel],
    sde: Sequence[Kernel],
    start: Tensor,
    branches: Sequence[int],
    generator: torch.Generator,
    chunk: int = 64,
    *,
    trunk_native: GuidedFn | None = None,
    trunk_dtype: torch.dtype | None = None,
) -> BranchRollout:
    """Pass 1: ODE trunks; pass 2a: k_i SDE children of x_i per parent; pass 2b: ODE to the end.

    ``trunk_native`` (default ``native``) gives pass 1's outputs, which pass 2a reuses; ``trunk_dtype``
    is the dtype pass 1 carries its state in between steps (x_0 drawn in it; the stored x_i are the
    float32 step outputs). The published sampler rounds both to fp16 and leaves pass 2b alone.

    ``branches`` has one entry per trunk step (at most one per sampler step); the trunk is walked
    that deep. The k_i children of a (parent, step) share the trunk's model output at x_i, which
    pass 1 already computed, so no evaluation is repeated: NFE per parent = len(branches) +
    sum_i k_i (N - 1 - i) (``Profile.nfe_per_parent``). Kernel arithmetic runs in float64, states are
    stored in float32.
    """
    steps, parents, depth = len(ode), start.shape[0], len(branches)
    if depth > steps:
        raise ValueError(f"a profile for an {steps}-step sampler has at most {steps} entries, got {depth}")
    everyone = torch.arange(parents)

    def carried(x: Tensor) -> Tensor:
        return x if trunk_dtype is None else x.to(trunk_dtype).float()

    trunk, natives, nfe = [carried(start)], [], 0
    for i in range(depth):
        natives.append(_evaluate(trunk_native or native, trunk[i], i, everyone, chunk))
        nfe += parents
        trunk.append(ode[i].mean(carried(trunk[i]).double(), natives[i].double()).float())
    parent_rows, step_rows, noises, children = [], [], [], []
    for i, k in enumerate(branches):
        if k == 0:
            continue
        x = trunk[i].repeat_interleave(k, 0)
        noise = torch.randn(x.shape, generator=generator)
        children.append(
            sde[i].sample(x.double(), natives[i].repeat_interleave(k, 0).double(), noise.double()).float()
        )
        noises.append(noise)
        parent_rows.append(everyone.repeat_interleave(k))
        step_rows.append(torch.full((parents * k,), i))
    state, parent, step = torch.cat(children), torch.cat(parent_rows), torch.cat(step_rows)
    for j in range(1, steps):
        moving = torch.nonzero(step < j).squeeze(1)  # children of steps before j are now at grid step j
        if moving.numel() == 0:
            continue
        f = _evaluate(native, state[moving], j, parent[moving], chunk)
        nfe += moving.numel()
        state[moving] = ode[j].mean(state[moving].double(), f.double()).float()
    return BranchRollout(
        trunk=torch.stack(trunk, 1),
        trunk_native=torch.stack(natives, 1),
        parent=parent,
        step=step,
        noise=torch.cat(noises),
        final=state,
        nfe=nfe,
    )
