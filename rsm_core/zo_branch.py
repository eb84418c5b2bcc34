"""Zeroth-order flow matching with branching rollouts: TempFlow-GRPO and its RSM redesigns as one arm.

Per epoch (zo_flow_tempflow spec §5-10): draw prompts, run the branching rollout for each parent
(ODE trunk, k_i one-step SDE children per step, ODE to the end), score every child's image, normalise
rewards within each (parent, step) group, then train on the rows with the published TempFlow
objective in the configured reweight (tempflow for the baseline, fair clipping for the redesigns).
The arms of Figure 3 differ only in ``profile`` and ``loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from baselines import tempflow_grpo
from baselines.tempflow_grpo import TempFlowConfig
from rsm_core import kernels, profiles
from rsm_core.backbones.base import Backbone
from rsm_core.budget import Budget
from rsm_core.rollout import branching_rollout
from rsm_core.transitions import Transitions

RewardFn = Callable[[Tensor, list[str], list[dict]], Tensor]


@dataclass(frozen=True)
class ZOBranchConfig:
    profile: str = "base"  # a published profile (rsm_core.profiles) or "auto-equal-variance"
    # auto-equal-variance keeps the total children per parent of this profile and starts from it
    auto_from: str = "base"
    sampler_steps: int = 10
    noise_level: float = 0.7
    cfg: float = 4.5
    prompts_per_epoch: int = 16
    seeds_per_prompt: int = 4  # parents per prompt; the 4 parents of a prompt are never pooled
    collection_batch: int = 4  # parents per sampling call
    microbatch_rows: int = 108  # rows per policy microbatch (latent_chunk_size 12 x 9 steps)
    chunk: int = 12  # rows per model call in the rollout
    adv_std_eps: float = 1e-4
    # GenEval redesign: a KL-to-reference row at each parent's ODE state of every k = 0 step
    ode_anchors: bool = False
    eval_steps: int = 40
    eval_seed: int = 1234
    # Deviation (named): the published eval draws fresh noise each time; fixed noise makes the eval
    # curve of every arm and epoch comparable at the small eval sets of the tiny scale.
    eval_fixed_noise: bool = True
    seed: int = 42
    loss: TempFlowConfig = field(default_factory=TempFlowConfig)


@dataclass
class EpochRows:
    """The epoch's parents (trunk states and outputs) and child rows (indices into the parents)."""

    prompts: list[str]  # per parent
    metas: list[dict]
    trunk: Tensor  # (P, N, *D)
    trunk_native: Tensor  # (P, N - 1, *D)
    parent: Tensor  # (R,)
    step: Tensor  # (R,)
    noise: Tensor  # (R, *D)
    reward: Tensor  # (R,)
    advantage: Tensor  # (R,)
    branch_weight: Tensor  # (R,)
    profile: profiles.Profile  # the profile these rows were collected with


def group_advantages(reward: Tensor, group: Tensor, eps: float) -> Tensor:
    """(r - mean_g) / (std_g + eps) within each group, population std (spec §7)."""
    _, inverse = torch.unique(group, return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1, dtype=reward.dtype).index_add_(
        0, inverse, torch.ones_like(reward)
    )
    mean = torch.zeros_like(count).index_add_(0, inverse, reward) / count
    var = torch.zeros_like(count).index_add_(0, inverse, (reward - mean[inverse]) ** 2) / count
    return (reward - mean[inverse]) / (var.sqrt()[inverse] + eps)


class ZOBranchArm:
    def __init__(
        self,
        backbone: Backbone,
        reward: RewardFn,
        train_prompts: Sequence[dict],
        eval_prompts: Sequence[dict],
        config: ZOBranchConfig,
        rank: int = 0,
        world: int = 1,
        eval_extra: dict[str, RewardFn] | None = None,
    ) -> None:
        """``rank`` of ``world`` data-parallel shards (processes, or shards accumulated in one process);
        ``eval_extra``: more rewards to measure on the evaluation images (e.g. strict GenEval)."""
        self.backbone, self.reward, self.config = backbone, reward, config
        self.eval_extra = dict(eval_extra or {})
        self.rank, self.world = rank, world
        self.train_prompts, self.eval_prompts = list(train_prompts), list(eval_prompts)
        self.generator = torch.Generator().manual_seed(config.seed + rank)  # set_seed(device_specific)
        self.calls = 0  # sampling calls so far: the prompt sampler's state
        self.ode = backbone.flow.ode_kernels(config.sampler_steps)
        self.sde = backbone.flow.sde_kernels(config.sampler_steps, config.noise_level)
        self.sde_grid = kernels.stack(self.sde)
        self.times = backbone.grid_times(config.sampler_steps)
        auto = config.profile == profiles.AUTO_EQUAL_VARIANCE
        self.profile = profiles.named(config.auto_from if auto else config.profile)
        self.spread_sum = np.zeros(len(self.profile.k))  # auto profile: summed per-step reward spread
        self.spread_count = np.zeros(len(self.profile.k))
        if (config.prompts_per_epoch * config.seeds_per_prompt) % (config.collection_batch * world):
            raise ValueError(
                "prompts_per_epoch x seeds_per_prompt must be a multiple of collection_batch x shards "
                f"({config.prompts_per_epoch} x {config.seeds_per_prompt} vs "
                f"{config.collection_batch} x {world})"
            )
        if auto and world > 1:
            raise ValueError("the auto-equal-variance profile measures one shard; run it with one shard")

    def parameters(self) -> list[nn.Parameter]:
        return self.backbone.trainable_parameters()

    # --- collection -----------------------------------------------------------------------------
    def _draw_prompts(self) -> list[dict]:
        """This shard's parents of one sampling call (the published KRepeatSampler): draw distinct
        prompts for all shards' slots, repeat each seeds_per_prompt times, shuffle the slots and give
        each shard collection_batch of them; seeded by seed + call counter, identical on all shards."""
        slots = self.config.collection_batch * self.world
        distinct = max(slots // self.config.seeds_per_prompt, 1)
        rng = np.random.default_rng(self.config.seed + self.calls)
        self.calls += 1
        picks = rng.choice(len(self.train_prompts), size=distinct, replace=False)
        metas = [self.train_prompts[i] for i in picks for _ in range(self.config.seeds_per_prompt)]
        order = rng.permutation(len(metas))
        mine = order[
            self.rank * self.config.collection_batch : (self.rank + 1) * self.config.collection_batch
        ]
        return [metas[i] for i in mine]

    def collect(self, budget: Budget) -> EpochRows:
        config, latent = self.config, self.backbone.latent_shape
        calls = config.prompts_per_epoch * config.seeds_per_prompt // (config.collection_batch * self.world)
        parts, metas, offset = [], [], 0
        with budget.timer("sample"):
            for _ in range(calls):
                call_metas = self._draw_prompts()
                cond = self.backbone.encode([m["prompt"] for m in call_metas])

                def guided(x: Tensor, step: int, parents: Tensor, cond=cond) -> Tensor:
                    return self.backbone.native(x, self.times[step], cond[parents], cfg=config.cfg)

                start = torch.randn(len(call_metas), *latent, generator=self.generator)
                out = branching_rollout(
                    guided, self.ode, self.sde, start, self.profile.k, self.generator, config.chunk
                )
                budget.nfe += out.nfe
                parts.append((out, offset))
                metas += call_metas
                offset += len(call_metas)
        prompts = [m["prompt"] for m in metas]
        parent = torch.cat([out.parent + off for out, off in parts])
        with budget.timer("reward"):
            images = torch.cat([self.backbone.decode(out.final) for out, _ in parts])
            reward = self.reward(images, [prompts[p] for p in parent], [metas[p] for p in parent]).float()
            budget.reward_calls += reward.numel()
        step = torch.cat([out.step for out, _ in parts])
        group = self._group(parent, step)
        weights = torch.tensor(
            [self.profile.branch_weight(i) if k else 0.0 for i, k in enumerate(self.profile.k)]
        )
        rows = EpochRows(
            prompts=prompts,
            metas=metas,
            trunk=torch.cat([out.trunk for out, _ in parts]),
            trunk_native=torch.cat([out.trunk_native for out, _ in parts]),
            parent=parent,
            step=step,
            noise=torch.cat([out.noise for out, _ in parts]),
            reward=reward,
            advantage=group_advantages(reward, group, config.adv_std_eps),
            branch_weight=weights[step],
            profile=self.profile,
        )
        self._measure_spread(rows, group)
        return rows

    def _measure_spread(self, rows: EpochRows, group: Tensor) -> None:
        """Per-step mean within-group reward std; re-derives the auto-equal-variance profile."""
        for i, k in enumerate(self.profile.k):
            if k < 2:
                continue
            mask = rows.step == i
            _, inverse = torch.unique(group[mask], return_inverse=True)
            values = rows.reward[mask]
            stds = [values[inverse == g].std(unbiased=False) for g in range(int(inverse.max()) + 1)]
            self.spread_sum[i] += float(torch.stack(stds).mean())
            self.spread_count[i] += 1
        if self.config.profile == profiles.AUTO_EQUAL_VARIANCE:
            self._reallocate()

    def _reallocate(self) -> None:
        measured = self.spread_count > 0
        spread = np.where(measured, self.spread_sum / np.maximum(self.spread_count, 1), 0.0)
        step_std = self.sde_grid.nu[: len(spread)].numpy()
        self.profile = profiles.equal_variance(step_std, spread, self.profile.total)

    # --- training -------------------------------------------------------------------------------
    def microbatches(self, batch: EpochRows, count_multiple: int) -> list[tuple]:
        """Shuffle the rows and pad (with zero-advantage, i.e. masked, duplicates) to whole microbatches
        whose count is a multiple of ``count_multiple`` (the optimizer steps per epoch). With ODE
        anchors, the epoch's anchor rows (one per parent and k = 0 step) are shuffled and split as
        evenly as possible across the microbatches (spec §9)."""
        size = self.config.microbatch_rows
        rows = batch.parent.numel()
        count = -(-rows // size)
        count = -(-count // count_multiple) * count_multiple
        order = torch.randperm(rows, generator=self.generator)
        missing = count * size - rows
        index = torch.cat([order, order.repeat(-(-missing // rows))[:missing]])
        valid = torch.arange(count * size) < rows
        anchors = torch.empty(0, dtype=torch.long)
        off = [i for i, k in enumerate(batch.profile.k) if k == 0]
        if self.config.ode_anchors and off:
            parents = len(batch.prompts)
            anchors = torch.arange(parents * len(off))[
                torch.randperm(parents * len(off), generator=self.generator)
            ]
        anchor_parts = torch.tensor_split(anchors, count)
        off_steps = torch.tensor(off, dtype=torch.long)
        return [
            (batch, index[s * size : (s + 1) * size], valid[s * size : (s + 1) * size], part, off_steps)
            for s, part in enumerate(anchor_parts)
        ]

    def _group(self, parent: Tensor, step: Tensor) -> Tensor:
        """One id per (parent, step): the advantage group of a child, and its shared trunk state."""
        return parent * len(self.times) + step

    def _outputs(self, batch: EpochRows, parent: Tensor, step: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_i, policy output with gradient, reference output) at the trunk states of (parent, step)
        pairs, each distinct state evaluated once (its k_i rows share it; exact, no dropout)."""
        pairs, inverse = torch.unique(self._group(parent, step), return_inverse=True)
        p_unique, s_unique = pairs // len(self.times), pairs % len(self.times)
        x = batch.trunk[p_unique, s_unique]
        cond = self.backbone.encode([batch.prompts[p] for p in p_unique.tolist()])
        t = self.times[s_unique]
        f_theta = self.backbone.native(x, t, cond, cfg=self.config.cfg)
        with torch.no_grad():
            f_ref = self.backbone.native(x, t, cond, cfg=self.config.cfg, adapter=False)
        return x[inverse], f_theta[inverse], f_ref[inverse]

    def loss(self, microbatch: tuple) -> tuple[Tensor, dict[str, float]]:
        batch, index, valid, anchors, off_steps = microbatch
        parent, step = batch.parent[index], batch.step[index]
        x, f_theta, f_ref = self._outputs(batch, parent, step)
        rows = Transitions(
            kernel=self.sde_grid.select(step),
            x=x,
            f_old=batch.trunk_native[parent, step],
            f_ref=f_ref,
            noise=batch.noise[index],
            advantage=batch.advantage[index] * valid,  # padding rows are masked like zero-advantage rows
            reward=batch.reward[index],
            branch_weight=batch.branch_weight[index],
        )
        config = self.config.loss
        per_row = tempflow_grpo.loss(f_theta, rows, config)
        loss = policy_loss = tempflow_grpo.microbatch_loss(per_row.loss, rows)
        anchor_kl = torch.zeros(())
        if anchors.numel():
            anchor_parent, anchor_step = anchors // len(off_steps), off_steps[anchors % len(off_steps)]
            x_a, f_a, f_ref_a = self._outputs(batch, anchor_parent, anchor_step)
            anchor_rows = Transitions(
                kernel=self.sde_grid.select(anchor_step), x=x_a, f_old=f_a.detach(), f_ref=f_ref_a
            )
            kl_rows = tempflow_grpo.kl_to_reference(f_a, anchor_rows, config.kl_denominator)
            anchor_kl = (kl_rows * batch.profile.k_avg).mean()  # anchors are not advantage-masked
            loss = loss + config.beta * anchor_kl
        with torch.no_grad():
            counted = rows.advantage != 0
            n = counted.sum().clamp(min=1)
            scale, _ = tempflow_grpo.clip_scale_and_weight(rows, config)
            log_ratio = scale * tempflow_grpo.mean_log_ratio(f_theta, rows)
            kl = tempflow_grpo.kl_to_reference(f_theta, rows, config.kl_denominator)
            stats = {
                "clipfrac": float(((~per_row.active) & counted).sum() / n),
                "approx_kl": float((0.5 * log_ratio**2 * counted).sum() / n),
                "kl_loss": float((kl * rows.branch_weight * counted).sum() / n),
                "kl_anchor_loss": float(anchor_kl),
                "policy_loss": float(policy_loss),
            }
        return loss, stats

    def batch_stats(self, batch: EpochRows) -> dict[str, float]:
        group = self._group(batch.parent, batch.step)
        _, inverse = torch.unique(group, return_inverse=True)
        zero = torch.zeros(int(inverse.max()) + 1).index_add_(0, inverse, (batch.advantage != 0).float()) == 0
        return {  # means over the shard's rows, so that equal-sized shards can be averaged
            "reward_mean": float(batch.reward.mean()),
            "reward_sq_mean": float((batch.reward**2).mean()),
            "zero_std_ratio": float(zero.float().mean()),
            **{f"k_{i}": float(k) for i, k in enumerate(batch.profile.k)},  # the profile collected with
        }

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """ODE samples of the fixed eval prompts: mean reward, and the KL of the policy's SDE kernels to
        the reference's along the 10-step ODE trajectory (exact per-element KL summed over the trained
        steps: a clean KL, not the published eval_kl_divergence)."""
        config = self.config
        prompts = [m["prompt"] for m in self.eval_prompts]
        generator = (
            torch.Generator().manual_seed(config.eval_seed) if config.eval_fixed_noise else self.generator
        )
        start = torch.randn(len(prompts), *self.backbone.latent_shape, generator=generator)
        cond = self.backbone.encode(prompts)
        x = start
        eval_ode = self.backbone.flow.ode_kernels(config.eval_steps)
        eval_times = self.backbone.grid_times(config.eval_steps)
        for i, kernel in enumerate(eval_ode):
            x = kernel.mean(
                x.double(), self.backbone.native(x, eval_times[i], cond, cfg=config.cfg).double()
            ).float()
        images = self.backbone.decode(x)
        reward = self.reward(images, prompts, self.eval_prompts)
        extra = {
            name: float(fn(images, prompts, self.eval_prompts).float().mean())
            for name, fn in self.eval_extra.items()
        }
        kl, x = torch.zeros(len(prompts), dtype=torch.float64), start
        for i in range(len(self.profile.k)):
            f = self.backbone.native(x, self.times[i], cond, cfg=config.cfg)
            f_ref = self.backbone.native(x, self.times[i], cond, cfg=config.cfg, adapter=False)
            kl += self.sde[i].kl(f.double(), f_ref.double(), reduction="mean")
            x = self.ode[i].mean(x.double(), f.double()).float()
        return {
            "reward": float(reward.mean()),
            "reward_std": float(reward.std()),
            "kl": float(kl.mean()),
            **extra,
        }

    # --- resume ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "calls": self.calls,
            "profile": list(self.profile.k),
            "spread_sum": self.spread_sum.tolist(),
            "spread_count": self.spread_count.tolist(),
        }

    def load_state(self, state: dict) -> None:
        self.calls = state["calls"]
        self.profile = profiles.Profile(self.profile.name, tuple(state["profile"]))
        self.spread_sum = np.array(state["spread_sum"])
        self.spread_count = np.array(state["spread_count"])
