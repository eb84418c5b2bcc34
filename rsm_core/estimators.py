"""Value-guidance estimators Psi_hat_t (theory spec §3) and reward centring / scaling.

Each estimator is split into a particle step (simulate K continuations of every state and return
one term per particle) and an estimate step (combine the first n terms). The split lets a study
evaluate every sample count on prefixes of one particle set, and lets a trainer use the per-particle
terms (advantages, reward gradients) directly.

Estimators for a batch of P states x_t (shape (P, *D)) at chain step i, entropy coefficient alpha:
- first order, current state (Eq. 13):   (1/alpha) grad_{x_t} r(x0_hat(x_t));
- first order, lookahead (Eq. 14):      (nu^2/(alpha b)) mean_k grad_{x_t'} r(x0_hat(x_{t-depth}));
- zeroth order, lookahead (Eq. 15):     (nu^2/(alpha b)) mean_k (r_k - baseline) eps_k / nu,
  with depth=None meaning a full rollout to x_0 (then x0_hat(x_0) = x_0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rsm_core.flows import per_sample
from rsm_core.interfaces import SampleReward
from rsm_core.kernels import Kernel
from rsm_core.rollout import Chain, NativeFn, ShareFn, rollout

Centering = Literal["none", "mean", "leave-one-out"]
Scaling = Literal["none", "std", "mad"]


def lookahead_scale(kernel: Kernel, alpha: float = 1.0) -> Tensor:
    """nu_t^2 / (alpha b_t): the factor of Prop. 3.1 that turns a reward gradient at x_t' into guidance."""
    return kernel.nu**2 / (alpha * kernel.b)


# ------------------------------------------------------------------------------------------------
# Rewards -> advantages
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupStats:
    """Per-group moments of flat values; ``index`` maps each value to its group (dense 0..G-1)."""

    index: Tensor  # (N,)
    ids: Tensor  # (G,) the group id of each group
    count: Tensor  # (G,)
    total: Tensor  # (G,) sum of the values
    mean: Tensor  # (G,)
    std: Tensor  # (G,) population std (ddof 0)
    constant: Tensor  # (G,) bool: every value of the group is the same (decided exactly, not by std)

    def per_row(self, values: Tensor) -> Tensor:
        return values[self.index]


def group_stats(values: Tensor, group_ids: Tensor | None = None) -> GroupStats:
    """Count, mean and population std of ``values`` within each group (one group when ids are None);
    the one pass every group statistic of the harness uses (advantages, reward spreads, zero-std
    ratios)."""
    if values.ndim != 1:
        raise ValueError(f"group statistics take flat values of shape (N,), got {tuple(values.shape)}")
    if group_ids is None:
        group_ids = torch.zeros_like(values, dtype=torch.long)
    ids, index = torch.unique(group_ids, return_inverse=True)
    zeros = torch.zeros(len(ids), dtype=values.dtype, device=values.device)
    count = zeros.index_add(0, index, torch.ones_like(values))
    total = zeros.index_add(0, index, values)
    mean = total / count
    var = zeros.index_add(0, index, (values - mean[index]) ** 2) / count
    high = zeros.scatter_reduce(0, index, values, reduce="amax", include_self=False)
    low = zeros.scatter_reduce(0, index, values, reduce="amin", include_self=False)
    return GroupStats(index, ids, count, total, mean, var.sqrt(), high == low)


def advantages(
    rewards: Tensor,
    group_ids: Tensor | None = None,
    *,
    center: Centering = "mean",
    scale: Scaling = "none",
    eps: float = 1e-4,
    clip: float | None = None,
) -> Tensor:
    """Centre and scale flat rewards within groups (one group when group_ids is None), in float64.

    "mean" subtracts the group mean including the sample itself (Flow-GRPO's tracker; an O(1/G) bias
    in a Stein estimate); "leave-one-out" subtracts the mean of the others (unbiased). "std" divides by
    the population std + eps, "mad" by the mean absolute deviation + eps; clip bounds the result.
    As in the published trackers the arithmetic is float64, and a centred group whose rewards are all
    equal gets advantage exactly 0 (its rows are masked downstream): float32 rounding would leave
    1e-4 to 5e-3 there (e.g. 8 or 10 children that all score 1/3, 2/3 or 3/5).
    """
    if center not in ("none", "mean", "leave-one-out"):
        raise ValueError(f"unknown centring {center!r}; choose 'none', 'mean' or 'leave-one-out'")
    if scale not in ("none", "std", "mad"):
        raise ValueError(f"unknown scaling {scale!r}; choose 'none', 'std' or 'mad'")
    rewards = rewards.double()
    stats = group_stats(rewards, group_ids)
    count, mean = stats.per_row(stats.count), stats.per_row(stats.mean)
    if center == "none":
        centered = rewards
    elif center == "mean":
        centered = rewards - mean
    else:
        if bool(torch.any(count < 2)):
            raise ValueError("leave-one-out centring needs at least two samples in every group")
        centered = rewards - (stats.per_row(stats.total) - rewards) / (count - 1)
    if scale == "std":
        centered = centered / (stats.per_row(stats.std) + eps)
    elif scale == "mad":
        deviation = (
            torch.zeros_like(stats.mean).index_add(0, stats.index, (rewards - mean).abs()) / stats.count
        )
        centered = centered / (stats.per_row(deviation) + eps)
    if center != "none":
        centered = torch.where(stats.per_row(stats.constant), torch.zeros_like(centered), centered)
    return centered.clamp(-clip, clip) if clip is not None else centered


def entropy_augmented_return(rewards: Tensor, path_kl: Tensor, alpha: float) -> Tensor:
    """r_tilde = r - alpha * KL-to-go: makes a zeroth-order estimator target the soft guidance (Thm B.3)."""
    return rewards - alpha * path_kl


# ------------------------------------------------------------------------------------------------
# Zeroth order
# ------------------------------------------------------------------------------------------------


@dataclass
class ZerothOrderParticles:
    rewards: Tensor  # (P, K)
    noise: Tensor  # (P, K, *D) first-step standard-normal draws
    path_kl: Tensor  # (P, K) KL-to-go to the reference (zeros without one)
    nu: Tensor  # first-step std (0-d or (P,))
    scale: Tensor  # nu^2 / (alpha b) of the first step (alpha = 1 here; divide by alpha to change it)


def _stop_step(chain: Chain, start: int, depth: int | None) -> int:
    stop = len(chain) if depth is None else start + depth
    if not start < stop <= len(chain):
        raise ValueError(f"lookahead depth {depth} from step {start} leaves the {len(chain)}-step chain")
    return stop


@torch.no_grad()
def zeroth_order_particles(
    chain: Chain,
    x: Tensor,
    start: int,
    *,
    depth: int | None,
    width: int,
    reward: SampleReward,
    generator: torch.Generator | None = None,
    share: ShareFn | None = None,
    reference: NativeFn | None = None,
) -> ZerothOrderParticles:
    """``width`` continuations of each state, ``depth`` steps deep (None: to x_0), one reward each.

    ``share`` makes the K continuations of a state a tree (see ``rollout``); ``reference`` also
    returns the KL-to-go for the entropy-augmented return.
    """
    stop = _stop_step(chain, start, depth)
    states = x.repeat_interleave(width, dim=0)
    run = rollout(chain, states, start, stop, generator=generator, share=share, reference=reference)
    r = reward(chain.x0_hat(run.final, stop))
    points = x.shape[0]
    kernel = chain.kernels[start]
    return ZerothOrderParticles(
        rewards=r.reshape(points, width),
        noise=run.first_noise.reshape(points, width, *x.shape[1:]),
        path_kl=run.path_kl.reshape(points, width),
        nu=kernel.nu,
        scale=lookahead_scale(kernel),
    )


def zeroth_order_estimate(
    rewards: Tensor, noise: Tensor, nu: Tensor, scale: Tensor, *, center: Centering = "mean"
) -> Tensor:
    """scale * mean_k A_k eps_k / nu with A the centred rewards of each state's K particles.

    rewards (P, K), noise (P, K, *D) -> (P, *D). Use ``entropy_augmented_return`` on the rewards
    first to target the soft guidance.
    """
    points, width = rewards.shape
    group_ids = torch.arange(points, device=rewards.device).repeat_interleave(width)
    adv = advantages(rewards.reshape(-1), group_ids, center=center).reshape(points, width)
    adv = adv.reshape(points, width, *([1] * (noise.ndim - 2)))
    signal = (adv * noise).mean(dim=1)
    return per_sample(scale / nu, signal) * signal


# ------------------------------------------------------------------------------------------------
# First order
# ------------------------------------------------------------------------------------------------


def first_order_current(
    chain: Chain,
    x: Tensor,
    step: int,
    reward: SampleReward,
    *,
    alpha: float = 1.0,
    jacobian: Literal["full", "identity"] = "full",
) -> Tensor:
    """(1/alpha) grad_{x_t} r(x0_hat(x_t)).

    "full" differentiates through the network inside Tweedie (DPS, Residual nabla-DB); "identity"
    stops the gradient at the native output (VGG-Flow), giving (1/alpha_t) grad r at x0_hat.
    """
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        point = chain.point(step)
        f = chain.f(leaf, step)
        if jacobian == "identity":
            f = f.detach()
        elif jacobian != "full":
            raise ValueError(f"unknown jacobian {jacobian!r}; choose 'full' or 'identity'")
        (grad,) = torch.autograd.grad(reward(point.x0(leaf, f)).sum(), leaf)
    return grad / alpha


def first_order_lookahead_particles(
    chain: Chain,
    x: Tensor,
    start: int,
    *,
    depth: int | None,
    width: int,
    reward: SampleReward,
    wrt: Literal["child", "state"] = "child",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-particle reward gradients (P, K, *D), differentiated through the reparameterised chain.

    "child": grad at the first child x_t' (Eq. 14; multiply the mean by ``lookahead_scale``).
    "state": the pathwise gradient at x_t itself, grad_{x_t} r(x0_hat(x_{t-depth})), an estimate of
    the hard value gradient with no prefactor (the toy's lookahead first-order curves).
    """
    stop = _stop_step(chain, start, depth)
    if wrt not in ("child", "state"):
        raise ValueError(f"unknown wrt {wrt!r}; choose 'child' or 'state'")
    with torch.enable_grad():
        leaf = x.detach().repeat_interleave(width, dim=0).requires_grad_(True)
        begin = start
        if wrt == "child":
            with torch.no_grad():
                first = rollout(chain, leaf, start, start + 1, generator=generator).final
            leaf = first.requires_grad_(True)
            begin = start + 1
        final = rollout(chain, leaf, begin, stop, generator=generator).final
        (grad,) = torch.autograd.grad(reward(chain.x0_hat(final, stop)).sum(), leaf)
    return grad.reshape(x.shape[0], width, *x.shape[1:])
