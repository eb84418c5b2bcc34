"""The zeroth-order trajectory arm: whole SDE rollouts, every transition a training row (PCPO, spec §3).

Per epoch: draw the shard's prompts (``layout.epoch_prompts``), sample each prompt
``generations_per_prompt`` times with the plain SDE sampler (PCPO's uw-sigma std) from shared
initial latents, keep every state, the sampling policy's outputs and the SDE draws, score the final
images, and normalise rewards within each prompt's group. Training walks the rows in the published
(DDPO) order: trajectories shuffled, each with its own permutation of the trained steps, and one
microbatch per (batch of ``train_batch`` trajectories, permutation position), so an update holds
whole trajectories. What the rows are trained with — the loss, its KL proxy, its diagnostics — is
the injected ``Objective``; nothing here branches on a method's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rsm_core import estimators
from rsm_core.arms import layout, walks
from rsm_core.backbones.base import POLICY
from rsm_core.budget import Budget
from rsm_core.config import require
from rsm_core.interfaces import Backbone, Objective, ParamGroup, Reward, check_needs
from rsm_core.scoring import ScoreQueue
from rsm_core.transitions import Transitions


@dataclass(frozen=True)
class ZOTrajectoryConfig:
    sampler_steps: int = 50
    trained_steps: int = 49  # the published trainer drops the last transition (t = 1 -> x_0)
    cfg: float = 5.0  # in sampling and in the training forward (gradients through both halves)
    # W of PCPO's uw-sigma std (spec §2); None: the DDPM std (DDIM eta = 1)
    uw_sigma: float | None = 4.5
    prompts_per_epoch: int = 32  # over all shards (published: 8 per rank on 4 GPUs)
    generations_per_prompt: int = 16  # the prompt's advantage group
    sample_batch: int = 8  # trajectories per sampling call
    # "shared_halves": two initial latents per epoch, each broadcast over whole sampling batches (the
    # first half of the batches start from one, the rest from the other), as published; so a group's
    # trajectories share x_T. "independent": a fresh x_T per trajectory.
    initial_noise: Literal["shared_halves", "independent"] = "shared_halves"
    adv_std_eps: float = 1e-8  # A = (r - mean) / (population std + eps) per prompt group
    train_batch: int = 4  # trajectories per microbatch, one transition of each
    decode_chunk: int = 8
    # threads scoring decoded chunks while the next sampling call runs (the published trainers: a
    # 2-thread executor); 0 scores in line. The scores do not change (rsm_core.scoring.ScoreQueue).
    reward_workers: int = 0
    eval_steps: int = 50
    eval_batch: int = 8
    eval_seed: int = 42  # test image j starts and steps with noise of its own generator (seed + j)

    def __post_init__(self) -> None:
        for name in ("sampler_steps", "trained_steps", "prompts_per_epoch", "generations_per_prompt"):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("sample_batch", "train_batch", "decode_chunk", "eval_steps", "eval_batch"):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        require(
            self.trained_steps <= self.sampler_steps,
            "trained_steps",
            f"a {self.sampler_steps}-step sampler has at most {self.sampler_steps} transitions",
        )
        require(self.uw_sigma is None or self.uw_sigma > 0, "uw_sigma", "must be positive (or null: DDPM)")
        require(self.adv_std_eps > 0, "adv_std_eps", "must be positive")
        require(self.reward_workers >= 0, "reward_workers", "must not be negative (0 = score in line)")
        require(self.generations_per_prompt >= 2, "generations_per_prompt", "a group needs two samples")


@dataclass
class Trajectories:
    """The shard's epoch: every state, the sampling policy's outputs and draws, rewards, advantages."""

    prompts: list[str]
    metas: list[dict]
    states: Tensor  # (T, N + 1, *D)
    native: Tensor  # (T, N, *D)
    noise: Tensor  # (T, N, *D)
    reward: Tensor  # (T,)
    advantage: Tensor  # (T,)
    group: Tensor  # (T,) the prompt group of each trajectory


@dataclass(frozen=True)
class Microbatch:
    batch: Trajectories
    trajectory: Tensor  # (b,)
    step: Tensor  # (b,)


class ZOTrajectoryArm:
    """One zeroth-order method on whole trajectories, one backbone and one data shard."""

    PROVIDES = ("kernel", "x", "f_old", "f_ref", "noise", "advantage", "reward")

    def __init__(
        self,
        backbone: Backbone,
        reward: Reward,
        objective: Objective,
        train_prompts: Sequence[dict],
        eval_prompts: Sequence[dict],
        config: ZOTrajectoryConfig,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        eval_extra: dict[str, Reward] | None = None,
    ) -> None:
        check_needs(objective, self.PROVIDES, "trajectory")
        if objective.kl is None or objective.diagnostics is None:
            raise ValueError(f"the trajectory arm needs {objective.name}'s KL proxy and diagnostics")
        if config.prompts_per_epoch % world:
            raise ValueError(
                f"prompts_per_epoch={config.prompts_per_epoch} must be a multiple of the {world} shards"
            )
        if (config.prompts_per_epoch // world * config.generations_per_prompt) % config.sample_batch:
            raise ValueError(
                "a shard's trajectories (prompts_per_epoch / shards x generations_per_prompt) must fill "
                f"whole sampling batches of sample_batch={config.sample_batch}"
            )
        self.backbone, self.reward, self.objective, self.config = backbone, reward, objective, config
        self.eval_extra = dict(eval_extra or {})
        self.seed, self.rank, self.world = seed, rank, world
        self.train_prompts, self.eval_prompts = list(train_prompts), list(eval_prompts)
        self.generator = torch.Generator().manual_seed(seed + rank)  # set_seed(device_specific)
        self.epochs = 0  # epochs drawn so far: the prompt sampler's state
        self.grid = backbone.flow.sde_grid(config.sampler_steps, uw_sigma=config.uw_sigma)
        self.times = backbone.grid_times(config.sampler_steps)
        self.eval_grid = backbone.flow.sde_grid(config.eval_steps, uw_sigma=config.uw_sigma)

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("policy", self.backbone.adapter_parameters(POLICY))]

    # --- collection -----------------------------------------------------------------------------
    def collect(self, budget: Budget) -> Trajectories:
        config, shape = self.config, self.backbone.latent_shape
        per_shard, repeats = config.prompts_per_epoch // self.world, config.generations_per_prompt
        metas = layout.epoch_prompts(
            self.train_prompts, self.seed, self.epochs, self.rank, self.world, per_shard, repeats
        )
        self.epochs += 1
        calls = len(metas) // config.sample_batch
        if config.initial_noise == "shared_halves":
            starts = layout.shared_initial_noise(calls, config.sample_batch, shape, self.generator)
        else:
            size = (config.sample_batch, *shape)
            starts = [torch.randn(size, generator=self.generator) for _ in range(calls)]
        paths = []
        with ScoreQueue(
            self.backbone, {"reward": self.reward}, config.decode_chunk, config.reward_workers
        ) as queue:
            for call, start in enumerate(starts):
                part = metas[call * config.sample_batch : (call + 1) * config.sample_batch]
                prompts = [m["prompt"] for m in part]
                with budget.timer("sample"):
                    path = walks.walk(
                        self.backbone,
                        self.grid,
                        self.times,
                        prompts,
                        start,
                        config.cfg,
                        lambda size: torch.randn(size, generator=self.generator),
                    )
                budget.nfe += len(part) * len(self.grid)
                with budget.timer("reward"):
                    queue.submit(path.states[:, -1], prompts, part)
                paths.append(path)
            with budget.timer("reward"):
                reward = queue.results()["reward"].double()
        budget.reward_calls += reward.numel()
        group = torch.arange(len(metas)) // config.generations_per_prompt
        advantage = estimators.advantages(reward, group, center="mean", scale="std", eps=config.adv_std_eps)
        return Trajectories(
            prompts=[m["prompt"] for m in metas],
            metas=metas,
            states=torch.cat([p.states for p in paths]),
            native=torch.cat([p.native for p in paths]),
            noise=torch.cat([p.noise for p in paths]),
            reward=reward,
            advantage=advantage,
            group=group,
        )

    # --- training -------------------------------------------------------------------------------
    def microbatches(self, batch: Trajectories, count_multiple: int) -> list[Microbatch]:
        """Trajectories shuffled, each with its own permutation of the trained steps; per batch of
        ``train_batch`` trajectories one microbatch per permutation position (the published order),
        so each of the ``count_multiple`` updates trains whole trajectories."""
        count, size, steps = len(batch.prompts), self.config.train_batch, self.config.trained_steps
        if count % (size * count_multiple):
            raise ValueError(
                f"{count} trajectories per shard do not split into {count_multiple} updates of whole "
                f"microbatches of train_batch={size}; choose sizes so that they do"
            )
        order = torch.randperm(count, generator=self.generator)
        steps_of = torch.stack([torch.randperm(steps, generator=self.generator) for _ in range(count)])
        return [
            Microbatch(batch, chunk, steps_of[chunk, j]) for chunk in order.split(size) for j in range(steps)
        ]

    def loss(self, microbatch: Microbatch) -> tuple[Tensor, dict[str, float]]:
        batch, trajectory, step = microbatch.batch, microbatch.trajectory, microbatch.step
        x = batch.states[trajectory, step]
        cond = self.backbone.encode([batch.prompts[i] for i in trajectory.tolist()])
        t = self.times[step]
        f_theta = self.backbone.native(x, t, cond, cfg=self.config.cfg)
        with torch.no_grad():  # the frozen reference, for the logged KL proxy
            f_ref = self.backbone.native(x, t, cond, cfg=self.config.cfg, adapter=None)
        rows = Transitions(
            kernel=self.grid.kernel.select(step),
            x=x,
            f_old=batch.native[trajectory, step],
            f_ref=f_ref,
            noise=batch.noise[trajectory, step],
            advantage=batch.advantage[trajectory],
            reward=batch.reward[trajectory],
        )
        surrogate = self.objective.loss(f_theta, rows)
        loss = surrogate.loss.mean()
        with torch.no_grad():
            diagnostics = self.objective.diagnostics(f_theta, rows, surrogate)
            stats = {name: float(value.double().mean()) for name, value in diagnostics.items()}
            stats["ratio_deviation"] = float(rows.ratio_deviation(f_theta).max())
        return loss, stats | {"policy_loss": float(loss.detach())}

    def batch_stats(self, batch: Trajectories) -> dict[str, float]:
        stats = estimators.group_stats(batch.reward, batch.group)
        return {
            "reward_mean": float(batch.reward.mean()),
            "reward_sq_mean": float((batch.reward**2).mean()),
            "zero_std_ratio": float(stats.constant.float().mean()),
        }

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self, part: int = 0, parts: int = 1) -> dict[str, Tensor]:
        """Per test image of this ``part`` of ``parts``: the reward of the plain SDE sampler's image
        (fixed noise per image), every extra reward, and along its walk the exact KL of the kernels and
        the method's KL proxy (spec §5)."""
        evaluation = walks.WalkEvaluation.sde(
            self.backbone,
            self.eval_grid,
            self.config.cfg,
            {"reward": self.reward, **self.eval_extra},
            self.objective.kl,
            self.config.eval_batch,
            self.config.decode_chunk,
            self.config.eval_seed,
        )
        return evaluation(self.eval_prompts, part, parts)

    # --- resume ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"epochs": self.epochs}

    def state_tensors(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, state: dict, tensors: dict[str, Tensor]) -> None:
        self.epochs = state["epochs"]
