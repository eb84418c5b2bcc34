"""The branching zeroth-order arm: ODE trunks, one-step SDE children, ODE tails (zo_flow_tempflow §5-10).

Per epoch: draw prompts, run the branching rollout for each parent (ODE trunk, k_i one-step SDE
children per step, ODE to the end), score every child's image, normalise rewards within each
(parent, step) group, then train on the child rows with the method's per-row objective. Which
method it is — TempFlow-GRPO as published, a fair-clipping redesign, another reweight — comes only
from the injected ``Objective`` and the branching profile in the config; nothing here branches on a
method's name.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from rsm_core import estimators, profiles
from rsm_core.arms import layout, walks
from rsm_core.backbones.base import POLICY
from rsm_core.budget import Budget
from rsm_core.config import require
from rsm_core.interfaces import Backbone, Objective, ParamGroup, Reward, check_needs
from rsm_core.rollout import branching_rollout
from rsm_core.scoring import ScoreQueue, decode_and_score
from rsm_core.transitions import Transitions


@dataclass(frozen=True)
class ZOBranchConfig:
    # a published profile (rsm_core.profiles), "auto-equal-variance", or "sparse": sparse_k children
    # at every sparse_stride-th of the sampler_steps - 1 trained steps (the SD1.5 redesign)
    profile: str = "base"
    # auto-equal-variance keeps the total children per parent of this profile and starts from it
    auto_from: str = "base"
    sparse_k: int = 4
    sparse_stride: int = 10
    sampler_steps: int = 10
    noise_level: float = 0.7
    # the children's SDE step on a vp (eps) model: None = DDPM; W = PCPO's uw-sigma std with that
    # constant (the SD1.5 redesign: 4.5, zo_diffusion spec §2)
    sde_uw_sigma: float | None = None
    cfg: float = 4.5
    prompts_per_epoch: int = 16  # over all shards
    seeds_per_prompt: int = 4  # parents per prompt
    collection_batch: int = 4  # parents per sampling call
    # "k_repeat": per sampling call, distinct prompts for all shards' slots, each seeds_per_prompt
    # times, shuffled over the slots (TempFlow-GRPO's sampler); "epoch": the SD1.5 trainers' shuffled
    # distributed sampler, each shard's prompts repeated in a row and cut into calls (rsm_core.arms.layout)
    prompt_sampler: Literal["k_repeat", "epoch"] = "k_repeat"
    # "independent": a fresh x_T per parent; "shared_halves": two x_T per epoch broadcast over whole
    # calls (the SD1.5 trainers), so the deterministic trunks of a prompt's parents coincide
    initial_noise: Literal["independent", "shared_halves"] = "independent"
    # the advantage group of a child: its (parent, step) (TempFlow-GRPO: a prompt's parents are never
    # pooled) or its (prompt, step) (the SD1.5 redesign's group_strategy "prompt")
    group_by: Literal["parent", "prompt"] = "parent"
    microbatch_rows: int = 108  # rows per policy microbatch (latent_chunk_size 12 x 9 steps)
    chunk: int = 12  # rows per model call in the rollout
    decode_chunk: int = 12  # images per VAE decode and reward call (published 12; memory only)
    # threads scoring decoded chunks while the next sampling call runs (published 8); 0 scores in
    # line. The scores do not change, only the schedule (rsm_core.scoring.ScoreQueue).
    reward_workers: int = 0
    adv_std_eps: float = 1e-4
    # GenEval redesign: a KL-to-reference row at each parent's ODE state of every k = 0 step
    ode_anchors: bool = False
    # 0: every anchor row (the flow trainer); r > 0: a random min(all, floor(r x child rows)) of them
    # (the SD1.5 redesign's anchor_row_max_ratio 0.1)
    anchor_ratio: float = 0.0
    # each anchor row weighted by k_avg, as the flow trainer does (spec §9); the SD1.5 redesign: 1
    anchor_k_avg: bool = True
    # "ode": the policy's ODE sample and the summed KL of the trained steps' SDE kernels along it
    # (TempFlow-GRPO's evaluation); "sde": the plain SDE sampler's sample with fixed noise, and the
    # exact KL and the method's proxy averaged over its steps (the SD1.5 trainers', spec §5)
    eval_sampler: Literal["ode", "sde"] = "ode"
    eval_steps: int = 40
    eval_batch: int = 16  # test images per sampling call and process (published 16 per GPU)
    # images per test prompt: 1 for Pick-a-Pic (Figure 3), 4 for GenEval's test metadata (spec §12)
    eval_images_per_prompt: int = 1
    eval_seed: int = 1234
    # Deviation (named): the published eval draws fresh noise each time; fixed noise makes the eval
    # curve of every arm and epoch comparable at the small eval sets of the tiny scale.
    eval_fixed_noise: bool = True
    # As published: under a half-precision autocast the trunk (pass 1, whose outputs pass 2a reuses)
    # and the evaluation combine CFG in that dtype, and the trunk carries its state in it (spec §2).
    # False: float32 throughout. No effect in full precision (the tiny world).
    half_rounding: bool = True

    def __post_init__(self) -> None:
        choices = [*profiles.PUBLISHED, profiles.AUTO_EQUAL_VARIANCE, profiles.SPARSE]
        require(
            self.profile in choices,
            "profile",
            f"unknown branching profile {self.profile!r}; choose {choices}",
        )
        require(
            self.auto_from in profiles.PUBLISHED, "auto_from", f"choose one of {list(profiles.PUBLISHED)}"
        )
        for name in ("sampler_steps", "prompts_per_epoch", "seeds_per_prompt", "collection_batch"):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("microbatch_rows", "chunk", "decode_chunk", "eval_steps", "eval_batch"):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        require(self.reward_workers >= 0, "reward_workers", "must not be negative (0 = score in line)")
        require(self.eval_images_per_prompt >= 1, "eval_images_per_prompt", "must be at least 1")
        require(self.noise_level > 0, "noise_level", "must be positive (the SDE children need noise)")
        require(self.adv_std_eps > 0, "adv_std_eps", "must be positive")
        require(self.anchor_ratio >= 0, "anchor_ratio", "must not be negative (0 = every anchor row)")
        require(self.sde_uw_sigma is None or self.sde_uw_sigma > 0, "sde_uw_sigma", "must be positive")
        require(self.sparse_k >= 1 and self.sparse_stride >= 1, "sparse_k", "sparse_k and sparse_stride >= 1")
        steps = len(self.initial_profile().k)
        require(  # the published trainers never train the last step (int(10 x 0.99) = 9 steps)
            steps <= self.sampler_steps - 1,
            "sampler_steps",
            f"the profile trains {steps} steps; a {self.sampler_steps}-step sampler trains at most "
            f"{self.sampler_steps - 1}",
        )

    def initial_profile(self) -> profiles.Profile:
        """The profile of the first epoch (auto-equal-variance re-derives it from measurements)."""
        if self.profile == profiles.SPARSE:
            return profiles.strided(self.sampler_steps - 1, self.sparse_stride, self.sparse_k)
        auto = self.profile == profiles.AUTO_EQUAL_VARIANCE
        return profiles.named(self.auto_from if auto else self.profile)


@dataclass
class EpochRows:
    """The epoch's parents (trunk states and outputs) and child rows (indices into the parents)."""

    prompts: list[str]  # per parent
    metas: list[dict]
    trunk: Tensor  # (P, L + 1, *D)
    trunk_native: Tensor  # (P, L, *D)
    parent: Tensor  # (R,)
    step: Tensor  # (R,)
    noise: Tensor  # (R, *D)
    reward: Tensor  # (R,)
    advantage: Tensor  # (R,)
    group: Tensor  # (R,) the advantage group of each child
    branch_weight: Tensor  # (R,)
    profile: profiles.Profile  # the profile these rows were collected with
    # the frozen reference's output at trunk states, computed once when first needed: (P, L, *D)
    reference: Tensor | None = None
    has_reference: Tensor | None = None  # (P, L) bool


@dataclass(frozen=True)
class Microbatch:
    rows: EpochRows
    index: Tensor  # child rows of this microbatch (padding repeats rows)
    valid: Tensor  # False on padding rows (masked like zero-advantage rows)
    anchors: Tensor  # ODE-anchor rows (parent x off-step pairs) assigned to this microbatch
    off_steps: Tensor  # the profile's k = 0 steps


class ZOBranchArm:
    """One zeroth-order method on one backbone and one data shard (``rank`` of ``world``)."""

    # Transitions fields this arm fills, so a method that needs another one fails at construction
    PROVIDES = ("kernel", "x", "f_old", "f_ref", "noise", "advantage", "reward", "branch_weight")

    def __init__(
        self,
        backbone: Backbone,
        reward: Reward,
        objective: Objective,
        train_prompts: Sequence[dict],
        eval_prompts: Sequence[dict],
        config: ZOBranchConfig,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        eval_extra: dict[str, Reward] | None = None,
    ) -> None:
        """``rank`` of ``world`` data-parallel shards (processes, or shards accumulated in one process);
        ``eval_extra``: more rewards to measure on the evaluation images (e.g. strict GenEval)."""
        check_needs(objective, self.PROVIDES, "branching")
        if objective.kl is None or objective.diagnostics is None:
            raise ValueError(f"the branching arm needs {objective.name}'s per-row KL and diagnostics")
        self.backbone, self.reward, self.objective, self.config = backbone, reward, objective, config
        self.rounding = backbone.autocast_dtype if config.half_rounding else None  # spec §2
        self.eval_extra = dict(eval_extra or {})
        self.seed, self.rank, self.world = seed, rank, world
        self.train_prompts, self.eval_prompts = list(train_prompts), list(eval_prompts)
        self.generator = torch.Generator().manual_seed(seed + rank)  # set_seed(device_specific)
        self.calls = 0  # sampling calls so far: the k_repeat prompt sampler's state
        self.epochs = 0  # epochs drawn so far: the epoch prompt sampler's state
        self.ode = backbone.flow.ode_grid(config.sampler_steps)
        self.sde = backbone.flow.sde_grid(config.sampler_steps, config.noise_level, config.sde_uw_sigma)
        self.times = backbone.grid_times(config.sampler_steps)
        auto = config.profile == profiles.AUTO_EQUAL_VARIANCE
        self.profile = config.initial_profile()
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
        shard_parents = config.prompts_per_epoch // world * config.seeds_per_prompt
        uneven = config.prompts_per_epoch % world or shard_parents % config.collection_batch
        if config.prompt_sampler == "epoch" and uneven:
            raise ValueError(
                "the epoch prompt sampler deals prompts_per_epoch over the shards and cuts each shard's "
                f"parents into calls of collection_batch: {config.prompts_per_epoch} prompts, {world} "
                f"shards, {config.seeds_per_prompt} seeds, calls of {config.collection_batch} do not divide"
            )

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("policy", self.backbone.adapter_parameters(POLICY))]

    # --- collection -----------------------------------------------------------------------------
    def _draw_prompts(self) -> list[dict]:
        """This shard's parents of one sampling call (the published KRepeatSampler): draw distinct
        prompts for all shards' slots, repeat each seeds_per_prompt times, shuffle the slots and give
        each shard collection_batch of them; seeded by seed + call counter, identical on all shards."""
        slots = self.config.collection_batch * self.world
        distinct = max(slots // self.config.seeds_per_prompt, 1)
        rng = np.random.default_rng(self.seed + self.calls)
        self.calls += 1
        picks = rng.choice(len(self.train_prompts), size=distinct, replace=False)
        metas = [self.train_prompts[i] for i in picks for _ in range(self.config.seeds_per_prompt)]
        order = rng.permutation(len(metas))
        mine = order[
            self.rank * self.config.collection_batch : (self.rank + 1) * self.config.collection_batch
        ]
        return [metas[i] for i in mine]

    def _calls(self) -> Iterator[tuple[list[dict], Tensor]]:
        """The epoch's sampling calls: each one's parents and their initial noise, drawn lazily (the
        noise of a call comes from the shard's generator right before its rollout)."""
        config, latent = self.config, self.backbone.latent_shape
        batches = None
        if config.prompt_sampler == "epoch":
            metas = layout.epoch_prompts(
                self.train_prompts,
                self.seed,
                self.epochs,
                self.rank,
                self.world,
                config.prompts_per_epoch // self.world,
                config.seeds_per_prompt,
            )
            self.epochs += 1
            size = config.collection_batch
            batches = [metas[s : s + size] for s in range(0, len(metas), size)]
        calls = config.prompts_per_epoch * config.seeds_per_prompt // (config.collection_batch * self.world)
        shared = None
        if config.initial_noise == "shared_halves":
            shared = layout.shared_initial_noise(calls, config.collection_batch, latent, self.generator)
        for call in range(calls):
            call_metas = batches[call] if batches is not None else self._draw_prompts()
            if shared is not None:
                yield call_metas, shared[call]
            else:
                yield call_metas, torch.randn(len(call_metas), *latent, generator=self.generator)

    def collect(self, budget: Budget) -> EpochRows:
        config = self.config
        parts, metas, offset = [], [], 0
        with ScoreQueue(
            self.backbone, {"reward": self.reward}, config.decode_chunk, config.reward_workers
        ) as queue:
            for call_metas, start in self._calls():
                with budget.timer("sample"):
                    cond = self.backbone.encode([m["prompt"] for m in call_metas])

                    def guided(x: Tensor, step: int, parents: Tensor, cond=cond, rounded=None) -> Tensor:
                        return self.backbone.native(
                            x, self.times[step], cond[parents], cfg=config.cfg, guidance_dtype=rounded
                        )

                    out = branching_rollout(
                        guided,
                        self.ode,
                        self.sde,
                        start,
                        self.profile.k,
                        self.generator,
                        config.chunk,
                        trunk_native=functools.partial(guided, rounded=self.rounding),
                        trunk_dtype=self.rounding,
                    )
                budget.nfe += out.nfe
                with budget.timer("reward"):  # decoding, and scoring that the workers do not hide
                    children = [call_metas[p] for p in out.parent]
                    queue.submit(out.final, [m["prompt"] for m in children], children)
                parts.append((out, offset))
                metas += call_metas
                offset += len(call_metas)
            with budget.timer("reward"):
                reward = queue.results()["reward"]
        budget.reward_calls += reward.numel()
        prompts = [m["prompt"] for m in metas]
        parent = torch.cat([out.parent + off for out, off in parts])
        step = torch.cat([out.step for out, _ in parts])
        group = self._advantage_group(prompts, parent, step)
        weights = torch.tensor(
            [self.profile.branch_weight(i) if k else 0.0 for i, k in enumerate(self.profile.k)]
        )
        advantage = estimators.advantages(reward, group, center="mean", scale="std", eps=config.adv_std_eps)
        rows = EpochRows(
            prompts=prompts,
            metas=metas,
            trunk=torch.cat([out.trunk for out, _ in parts]),
            trunk_native=torch.cat([out.trunk_native for out, _ in parts]),
            parent=parent,
            step=step,
            noise=torch.cat([out.noise for out, _ in parts]),
            reward=reward,
            advantage=advantage,
            group=group,
            branch_weight=weights[step],
            profile=self.profile,
        )
        self._measure_spread(rows, group)
        return rows

    def _advantage_group(self, prompts: list[str], parent: Tensor, step: Tensor) -> Tensor:
        """One id per (parent, step), or per (prompt, step) with group_by="prompt"."""
        if self.config.group_by == "parent":
            return self._group(parent, step)
        ids = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
        owner = torch.tensor([ids[prompt] for prompt in prompts])[parent]
        return self._group(owner, step)

    def _measure_spread(self, rows: EpochRows, group: Tensor) -> None:
        """Per-step mean within-group reward std; re-derives the auto-equal-variance profile."""
        stats = estimators.group_stats(rows.reward, group)
        group_step = stats.ids % len(self.times)
        for i, k in enumerate(self.profile.k):
            if k >= 2:
                self.spread_sum[i] += float(stats.std[group_step == i].mean())
                self.spread_count[i] += 1
        if self.config.profile == profiles.AUTO_EQUAL_VARIANCE:
            measured = self.spread_count > 0
            spread = np.where(measured, self.spread_sum / np.maximum(self.spread_count, 1), 0.0)
            step_std = self.sde.kernel.nu[: len(spread)].numpy()
            self.profile = profiles.equal_variance(step_std, spread, self.profile.total)

    # --- training -------------------------------------------------------------------------------
    def microbatches(self, batch: EpochRows, count_multiple: int) -> list[Microbatch]:
        """Shuffle the rows and pad (with masked duplicates) to whole microbatches whose count is a
        multiple of ``count_multiple`` (the optimizer steps per epoch). With ODE anchors, the epoch's
        anchor rows (one per parent and k = 0 step) are shuffled and split as evenly as possible
        across the microbatches (spec §9)."""
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
            pairs = len(batch.prompts) * len(off)
            anchors = torch.arange(pairs)[torch.randperm(pairs, generator=self.generator)]
            if self.config.anchor_ratio > 0:  # a random subset of at most ratio x child rows
                anchors = anchors[: min(pairs, int(self.config.anchor_ratio * rows))]
        off_steps = torch.tensor(off, dtype=torch.long)
        return [
            Microbatch(
                batch, index[s * size : (s + 1) * size], valid[s * size : (s + 1) * size], part, off_steps
            )
            for s, part in enumerate(torch.tensor_split(anchors, count))
        ]

    def _group(self, parent: Tensor, step: Tensor) -> Tensor:
        """One id per (parent, step): the advantage group of a child, and its shared trunk state."""
        return parent * len(self.times) + step

    def _outputs(self, batch: EpochRows, parent: Tensor, step: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x_i, policy output with gradient, reference output) at the trunk states of (parent, step)
        pairs. Each distinct state is evaluated once per microbatch by the policy (its k_i rows share
        it; exact, no dropout) and once per epoch by the frozen reference."""
        pairs, inverse = torch.unique(self._group(parent, step), return_inverse=True)
        p_unique, s_unique = pairs // len(self.times), pairs % len(self.times)
        x = batch.trunk[p_unique, s_unique]
        cond = self.backbone.encode([batch.prompts[p] for p in p_unique.tolist()])
        t = self.times[s_unique]
        f_theta = self.backbone.native(x, t, cond, cfg=self.config.cfg)
        if batch.reference is None:
            batch.reference = torch.zeros_like(batch.trunk_native)
            batch.has_reference = torch.zeros(batch.trunk_native.shape[:2], dtype=torch.bool)
        todo = ~batch.has_reference[p_unique, s_unique]
        if bool(todo.any()):
            with torch.no_grad():
                fresh = self.backbone.native(x[todo], t[todo], cond[todo], cfg=self.config.cfg, adapter=None)
            batch.reference[p_unique[todo], s_unique[todo]] = fresh
            batch.has_reference[p_unique[todo], s_unique[todo]] = True
        f_ref = batch.reference[p_unique, s_unique]
        return x[inverse], f_theta[inverse], f_ref[inverse]

    def loss(self, microbatch: Microbatch) -> tuple[Tensor, dict[str, float]]:
        batch, index = microbatch.rows, microbatch.index
        parent, step = batch.parent[index], batch.step[index]
        x, f_theta, f_ref = self._outputs(batch, parent, step)
        rows = Transitions(
            kernel=self.sde.kernel.select(step),
            x=x,
            f_old=batch.trunk_native[parent, step],
            f_ref=f_ref,
            noise=batch.noise[index],
            advantage=batch.advantage[index] * microbatch.valid,  # padding is masked like A = 0
            reward=batch.reward[index],
            branch_weight=batch.branch_weight[index],
        )
        per_row = self.objective.loss(f_theta, rows)
        counted = rows.advantage != 0  # the published mask: zero-advantage and padding rows drop out
        n = counted.sum().clamp(min=1)
        loss = policy_loss = (per_row.loss * counted).sum() / n
        anchor_kl = torch.zeros(())
        if microbatch.anchors.numel():
            anchors, off_steps = microbatch.anchors, microbatch.off_steps
            anchor_parent, anchor_step = anchors // len(off_steps), off_steps[anchors % len(off_steps)]
            x_a, f_a, f_ref_a = self._outputs(batch, anchor_parent, anchor_step)
            anchor_rows = Transitions(
                kernel=self.sde.kernel.select(anchor_step), x=x_a, f_old=f_a.detach(), f_ref=f_ref_a
            )
            # anchors are not advantage-masked; each carries the weight k_avg (flow spec §9) or 1
            weight = batch.profile.k_avg if self.config.anchor_k_avg else 1.0
            anchor_kl = (self.objective.kl(f_a, anchor_rows) * weight).mean()
            loss = loss + self.objective.beta * anchor_kl
        with torch.no_grad():
            diagnostics = self.objective.diagnostics(f_theta, rows, per_row)
            stats = {name: float((value * counted).sum() / n) for name, value in diagnostics.items()}
            stats["ratio_deviation"] = float(rows.ratio_deviation(f_theta).max())
        return loss, stats | {
            "kl_anchor_loss": float(anchor_kl.detach()),
            "policy_loss": float(policy_loss.detach()),
        }

    def batch_stats(self, batch: EpochRows) -> dict[str, float]:
        stats = estimators.group_stats(batch.reward, batch.group)
        return {  # means over the shard's rows, so that equal-sized shards can be averaged
            "reward_mean": float(batch.reward.mean()),
            "reward_sq_mean": float((batch.reward**2).mean()),
            "zero_std_ratio": float(stats.constant.float().mean()),
            **{f"k_{i}": float(k) for i, k in enumerate(batch.profile.k)},  # the profile collected with
        }

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self, part: int = 0, parts: int = 1) -> dict[str, Tensor]:
        """Per test image of this ``part`` of ``parts`` (a contiguous slice of the fixed test set,
        ``eval_images_per_prompt`` images per prompt), in sampling calls of ``eval_batch``: the reward
        of its ODE sample, every extra reward, and the KL of the policy's SDE kernels to the
        reference's along the sampler's ODE trajectory (exact per-element KL summed over the trained
        steps: a clean KL, not the published eval_kl_divergence). The initial noise of the whole set
        is drawn on every process, so the values do not depend on how it is split."""
        config = self.config
        metas = [m for m in self.eval_prompts for _ in range(config.eval_images_per_prompt)]
        if config.eval_sampler == "sde":
            return self._evaluate_sde(metas, part, parts)
        generator = (
            torch.Generator().manual_seed(config.eval_seed) if config.eval_fixed_noise else self.generator
        )
        noise = torch.randn(len(metas), *self.backbone.latent_shape, generator=generator)
        mine = range(part * len(metas) // parts, (part + 1) * len(metas) // parts)
        values: dict[str, list[Tensor]] = {"reward": [], "kl": [], **{name: [] for name in self.eval_extra}}
        for first in range(mine.start, mine.stop, config.eval_batch):
            batch = slice(first, min(first + config.eval_batch, mine.stop))
            for name, scores in self._evaluate_batch(metas[batch], noise[batch]).items():
                values[name].append(scores)
        return {
            name: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64) for name, v in values.items()
        }

    def _evaluate_batch(self, metas: list[dict], start: Tensor) -> dict[str, Tensor]:
        config, prompts = self.config, [m["prompt"] for m in metas]
        latents = self.backbone.sample_ode(
            prompts, config.eval_steps, config.cfg, start=start, guidance_dtype=self.rounding
        )
        rewards = {"reward": self.reward, **self.eval_extra}
        scores = decode_and_score(self.backbone, rewards, latents, prompts, metas, config.decode_chunk)
        kl = torch.zeros(len(prompts), dtype=torch.float64)
        cond, trained = self.backbone.encode(prompts), len(self.profile.k)

        def add_kl(i: int, x: Tensor, f: Tensor) -> None:
            nonlocal kl
            f_ref = self.backbone.native(x, self.times[i], cond, cfg=config.cfg, adapter=None)
            kl = kl + self.sde[i].kl(f.double(), f_ref.double(), reduction="mean")

        self.backbone.sample_ode(
            prompts, config.sampler_steps, config.cfg, start=start, observe=add_kl, until=trained
        )
        return {name: value.double() for name, value in scores.items()} | {"kl": kl}

    def _evaluate_sde(self, metas: list[dict], part: int, parts: int) -> dict[str, Tensor]:
        """The plain SDE sampler over eval_steps with the children's kernel (spec §5)."""
        config, flow = self.config, self.backbone.flow
        grid = flow.sde_grid(config.eval_steps, config.noise_level, config.sde_uw_sigma)
        evaluation = walks.WalkEvaluation.sde(
            self.backbone,
            grid,
            config.cfg,
            {"reward": self.reward, **self.eval_extra},
            self.objective.kl,
            config.eval_batch,
            config.decode_chunk,
            config.eval_seed if config.eval_fixed_noise else None,
            self.generator,
        )
        return evaluation(metas, part, parts)

    # --- resume ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "calls": self.calls,
            "epochs": self.epochs,
            "profile": list(self.profile.k),
            "spread_sum": self.spread_sum.tolist(),
            "spread_count": self.spread_count.tolist(),
        }

    def state_tensors(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, state: dict, tensors: dict[str, Tensor]) -> None:
        self.calls, self.epochs = state["calls"], state["epochs"]
        self.profile = profiles.Profile(self.profile.name, tuple(state["profile"]))
        self.spread_sum = np.array(state["spread_sum"])
        self.spread_count = np.array(state["spread_count"])
