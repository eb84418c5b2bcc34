"""The first-order arm kind: whole trajectories of the policy, rows at (some of) their transitions, and
the reward's gradient through the decoder as the training signal (fo_first_order spec §A, §B).

Per epoch: sample trajectories with the current policy (Euler ODE for VGG-Flow, DDIM eta = 1 for
nabla-DB) under no grad, keep every state, the sampling policy's outputs and the final reward;
choose the transitions each trajectory trains (all of them, chronological, for VGG-Flow; the
low-variance draw of nabla-DB: the last step plus one step per trunk); then, per microbatch, give the
method's loss rows with the reward-gradient estimate its config names:

- ``tweedie``: grad_x r(decode(x0_hat(x, sg f_theta))) at the current state, identity Jacobian
  through the detached output (pruned VGG-Flow);
- ``lookahead``: grad_{x_t'} r(decode(x0_hat_theta(x_t'))) at the next state, through the current
  policy (full Jacobian; the final step's Tweedie map is the identity) (pruned nabla-DB);
- ``terminal``: grad_{x_0} r(decode(x_0)) at the trajectory's own final latent, computed once at
  collection (the redesign's terminal-image gradient);
- ``none``: no reward gradient in the rows, for a loss that differentiates the reward itself (SQDF,
  through ``lookahead_reward``: the frozen reference's Tweedie estimate at the next state).

The loss (clipping, scales, temporal weights) is the method's; the arm only supplies the rows, and,
for the unpruned algorithms, their auxiliary network (``auxiliary``: VGG-Flow's value network,
nabla-GFN's residual network; see rsm_core.arms.auxiliary) with its own parameter group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from rsm_core.arms import auxiliary, walks
from rsm_core.backbones.base import POLICY
from rsm_core.budget import Budget
from rsm_core.config import require
from rsm_core.flows import per_sample
from rsm_core.grids import Grid
from rsm_core.interfaces import Backbone, Objective, ParamGroup, Reward, check_needs
from rsm_core.kernels import reduce_per_sample
from rsm_core.scoring import decode_and_score
from rsm_core.transitions import Transitions

Estimator = Literal["tweedie", "lookahead", "terminal", "none"]
_ESTIMATORS = ["tweedie", "lookahead", "terminal"]  # the ones that put a reward gradient in the rows


@dataclass(frozen=True)
class FOTrajectoryConfig:
    sampler: Literal["ode", "ddpm"] = "ode"  # Euler ODE (VGG-Flow) or DDIM with eta = 1 (nabla-DB)
    sampler_steps: int = 20
    cfg: float = 5.0
    # the training forward's CFG: "detach_uncond" stops the gradient through the unconditional half
    # (VGG-Flow, spec §0.2); "both" lets it flow through both (nabla-DB, spec §0.1)
    cfg_grad: Literal["both", "detach_uncond"] = "detach_uncond"
    trajectories_per_epoch: int = 8  # per shard (VGG-Flow: 8 prompts per rank; nabla-DB: 64)
    collection_batch: int = 8  # trajectories per sampling call
    # "all": every transition, chronological (VGG-Flow, timestep_fraction 1); "low_variance": the last
    # step plus one uniform draw per trunk of steps, last trunk first (nabla-DB, spec §A.2); "uniform":
    # one uniform step per trajectory (SQDF, spec §C.1)
    transitions: Literal["all", "low_variance", "uniform"] = "all"
    timestep_fraction: float = 1.0  # low_variance: int(N fraction) trunks, int(N fraction) + 1 rows
    estimator: Estimator = "tweedie"
    # the rows' noise: the draw that made x_t' ("stored"), or a fresh N(0, I) per row ("fresh": SQDF's
    # reparameterised next state mu_theta + nu z, spec §C.1)
    row_noise: Literal["stored", "fresh"] = "stored"
    # 0: train on this epoch's trajectories (every RSM run, App. G.3). > 0: SQDF's replay buffer
    # (spec §C.2): keep the last ``replay_capacity`` trajectories of this shard (published 1024 over
    # 2 GPUs) and train each epoch on trajectories_per_epoch of them drawn uniformly without
    # replacement ('random' sampling at replay ratio 1; without replacement is [inferred])
    replay_capacity: int = 0
    # The unpruned algorithms' auxiliary network (rsm_core.arms.auxiliary) and its settings; the
    # published ones are VGG-Flow's (spec §B.5: LoRA rank 8, alpha 8, output layer x 1e-5, the
    # policy's AdamW settings, its own clip 1) and nabla-GFN's (spec §A.6: widths (64, 128, 256, 256),
    # lr 1e-3, decay 1e-2, its own clip 1). None: the loop's setting.
    auxiliary: auxiliary.AuxiliaryKind = "none"
    aux_lora_rank: int = 8
    aux_lora_alpha: float = 8.0
    aux_head_scale: float = 1e-5
    aux_residual_channels: tuple[int, ...] = (64, 128, 256, 256)
    aux_lr: float | None = None
    aux_weight_decay: float | None = None
    aux_max_grad_norm: float | None = 1.0
    # What the value network sees: "empty" is the published code's (it slices the empty-prompt half
    # of the [negative; positive] embeddings, spec §B.5 / E.7); "prompt" gives it the row's prompt.
    value_condition: Literal["empty", "prompt"] = "empty"
    microbatch_rows: int = 4  # rows per forward pass (memory only: an update's rows are fixed)
    decode_chunk: int = 12
    eval_batch: int = 8
    eval_images_per_prompt: int = 1
    eval_seed: int = 1234
    # Deviation (named): the published evaluations draw fresh noise (and nabla-DB fresh prompts)
    # each time; fixed noise makes every arm's curve comparable at the tiny scale's small test sets.
    eval_fixed_noise: bool = True
    # True: every shard draws the same prompts and noise, as the published VGG-Flow code does (its
    # ranks all seed alike: ~8 distinct trajectories per epoch on 4 GPUs, spec §B.1, E.4); False: each
    # shard its own stream, the stated intent (32 distinct)
    rank_identical_seeding: bool = False

    def __post_init__(self) -> None:
        for name in ("sampler_steps", "trajectories_per_epoch", "collection_batch", "microbatch_rows"):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        for name in ("decode_chunk", "eval_batch", "eval_images_per_prompt"):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        require(
            self.trajectories_per_epoch % self.collection_batch == 0,
            "trajectories_per_epoch",
            f"must be a multiple of collection_batch ({self.collection_batch})",
        )
        require(0 < self.timestep_fraction <= 1, "timestep_fraction", "must be in (0, 1]")
        require(
            self.replay_capacity == 0 or self.replay_capacity >= self.trajectories_per_epoch,
            "replay_capacity",
            f"must be 0 (no buffer) or hold at least trajectories_per_epoch ({self.trajectories_per_epoch})",
        )
        if self.transitions == "low_variance":
            require(
                int(self.sampler_steps * self.timestep_fraction) >= 1,
                "timestep_fraction",
                f"leaves no trunk of a {self.sampler_steps}-step sampler",
            )

    @property
    def rows_per_trajectory(self) -> int:
        if self.transitions == "all":
            return self.sampler_steps
        if self.transitions == "uniform":
            return 1
        return int(self.sampler_steps * self.timestep_fraction) + 1

    @property
    def auxiliary_settings(self) -> auxiliary.AuxiliarySettings:
        return auxiliary.AuxiliarySettings(
            kind=self.auxiliary,
            lora_rank=self.aux_lora_rank,
            lora_alpha=self.aux_lora_alpha,
            head_scale=self.aux_head_scale,
            residual_channels=tuple(self.aux_residual_channels),
            lr=self.aux_lr,
            weight_decay=self.aux_weight_decay,
            max_grad_norm=self.aux_max_grad_norm,
        )


def low_variance_steps(steps: int, fraction: float, generator: torch.Generator) -> Tensor:
    """The published draw (spec §A.2): [N - 1], then one uniform step of each trunk of N // n
    consecutive steps, last trunk first; the first int(N fraction) + 1 entries. The last step can be
    drawn twice."""
    trunks = int(steps * fraction)
    size = steps // trunks
    draws = [j * size + int(torch.randint(size, (1,), generator=generator)) for j in reversed(range(trunks))]
    return torch.tensor([steps - 1, *draws][: trunks + 1])


def _check_pairing(objective: Objective, config: FOTrajectoryConfig) -> None:
    """The arm computes a reward gradient and builds an auxiliary network only for a loss that reads
    them, and always for one that does."""
    name = objective.name
    if "reward_grad" in objective.needs and config.estimator == "none":
        raise ValueError(
            f"{name} trains on its rows' reward gradient; set arm.estimator to one of {_ESTIMATORS}"
        )
    if "reward_grad" not in objective.needs and config.estimator != "none":
        raise ValueError(
            f"{name} reads no reward gradient from its rows; set arm.estimator=none (computing "
            "one would only spend reward-gradient calls)"
        )
    if "aux_field" in objective.needs and config.auxiliary == "none":
        raise ValueError(
            f"{name} trains an auxiliary network; set arm.auxiliary to value_adapter or residual_unet"
        )
    if "aux_field" not in objective.needs and config.auxiliary != "none":
        raise ValueError(f"{name} has no auxiliary network to train; set arm.auxiliary=none")


@dataclass
class Trajectories:
    """An epoch's trajectories: every state, the sampling policy's outputs, the chosen rows."""

    prompts: list[str]  # per trajectory
    metas: list[dict]
    states: Tensor  # (T, N + 1, *D)
    native: Tensor  # (T, N, *D)
    noise: Tensor | None  # (T, N, *D) the DDPM draws (None for the ODE)
    reward: Tensor  # (T,)
    terminal_grad: Tensor | None  # (T, *D) with the terminal estimator
    trajectory: Tensor  # (R,) the trajectory of each row
    step: Tensor  # (R,) its transition

    TENSORS = ("states", "native", "noise", "reward", "terminal_grad")

    @staticmethod
    def rowless(prompts: list[str], metas: list[dict], **tensors: Tensor | None) -> Trajectories:
        """Trajectories before any rows are chosen (fresh, joined or restored)."""
        empty = torch.zeros(0, dtype=torch.long)
        return Trajectories(prompts, metas, **tensors, trajectory=empty, step=empty)

    def select(self, index: Tensor, rows: tuple[Tensor, Tensor]) -> Trajectories:
        """The trajectories ``index`` with new rows (trajectory, step) into them."""
        picked = {name: _take(getattr(self, name), index) for name in self.TENSORS}
        order = index.tolist()
        return Trajectories(
            [self.prompts[i] for i in order],
            [self.metas[i] for i in order],
            **picked,
            trajectory=rows[0],
            step=rows[1],
        )

    @staticmethod
    def cat(parts: Sequence[Trajectories]) -> Trajectories:
        """The trajectories of ``parts`` one after another, without rows."""
        joined = {
            name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
            for name in Trajectories.TENSORS
        }
        return Trajectories.rowless(
            [x for p in parts for x in p.prompts], [x for p in parts for x in p.metas], **joined
        )


def _take(values: Tensor | None, index: Tensor) -> Tensor | None:
    return None if values is None else values[index]


@dataclass(frozen=True)
class Microbatch:
    batch: Trajectories
    index: Tensor  # rows of the batch


class FOTrajectoryArm:
    """One first-order method on one backbone and one data shard (``rank`` of ``world``)."""

    PROVIDES = (
        "kernel",
        "x",
        "f_old",
        "f_ref",
        "noise",
        "reward",
        "reward_grad",
        "steps_remaining",
        "lookahead_reward",
        "time",
        "time_next",
        "policy_field",
        "reference_field",
        "aux_field",
        "sample_reward",
    )

    def __init__(
        self,
        backbone: Backbone,
        reward: Reward,
        objective: Objective,
        train_prompts: Sequence[dict],
        eval_prompts: Sequence[dict],
        config: FOTrajectoryConfig,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        eval_extra: dict[str, Reward] | None = None,
    ) -> None:
        check_needs(objective, self.PROVIDES, "first-order")
        _check_pairing(objective, config)
        if not getattr(reward, "differentiable", False):
            raise ValueError(
                f"{objective.name} trains on reward gradients; reward {getattr(reward, 'name', reward)!r} "
                "is not differentiable (choose one whose images -> score is, e.g. shapes_hps)"
            )
        self.backbone, self.reward, self.objective, self.config = backbone, reward, objective, config
        self.eval_extra = dict(eval_extra or {})
        self.seed, self.rank, self.world = seed, rank, world
        self.train_prompts, self.eval_prompts = list(train_prompts), list(eval_prompts)
        self.stream = 0 if config.rank_identical_seeding else rank  # of prompts and noise
        self.generator = torch.Generator().manual_seed(seed + self.stream)
        self.calls = 0  # sampling calls so far: the prompt sampler's state
        self.grid = self._grid(config.sampler_steps)
        self.times = backbone.grid_times(config.sampler_steps)
        # the time of each step's next state: the following step's, and 0 (data) after the last
        self.times_next = torch.cat([self.times[1:], self.times.new_zeros(1)])
        self.reward_grad_calls = 0
        self.buffer: Trajectories | None = None  # the replay buffer (replay_capacity > 0)
        self.collected: Trajectories | None = None  # this epoch's fresh trajectories (logged rewards)
        self.aux = None
        if config.auxiliary != "none":
            self.aux = auxiliary.attach(backbone, config.auxiliary_settings, seed)

    def _grid(self, steps: int) -> Grid:
        flow = self.backbone.flow
        return flow.ode_grid(steps) if self.config.sampler == "ode" else flow.sde_grid(steps)

    def param_groups(self) -> list[ParamGroup]:
        groups = [ParamGroup("policy", self.backbone.adapter_parameters(POLICY))]
        if self.aux is not None:
            groups.append(auxiliary.param_group(self.aux, self.config.auxiliary_settings))
        return groups

    # --- collection -----------------------------------------------------------------------------
    def _draw_prompts(self, count: int) -> list[dict]:
        """Uniform with replacement from the training prompts (both published samplers), a different
        stream per shard (unless ``rank_identical_seeding``)."""
        rng = np.random.default_rng([self.seed, self.stream, self.calls])
        self.calls += 1
        return [self.train_prompts[i] for i in rng.integers(len(self.train_prompts), size=count)]

    def _sample_reward(self, prompts: list[str], metas: list[dict]) -> Callable[[Tensor], Tensor]:
        """Clean latents -> rewards of their decoded images for these prompts, differentiable; every
        call counts as reward-gradient calls."""

        def reward(latents: Tensor) -> Tensor:
            self.reward_grad_calls += latents.shape[0]
            return self.reward(self.backbone.decode(latents), prompts, metas)

        return reward

    def _reward_grad(self, point: Tensor, to_image_latent, prompts: list[str], metas: list[dict]) -> Tensor:
        """grad_z r(decode(to_image_latent(z))) at z = ``point``, per sample (detached)."""
        grads = []
        for s in range(0, point.shape[0], self.config.decode_chunk):
            part = slice(s, s + self.config.decode_chunk)
            with torch.enable_grad():
                z = point[part].detach().requires_grad_(True)
                score = self._sample_reward(prompts[part], metas[part])(to_image_latent(z, part))
                (grad,) = torch.autograd.grad(score.sum(), z)
            grads.append(grad.detach())
        return torch.cat(grads)

    def collect(self, budget: Budget) -> Trajectories:
        config, latent = self.config, self.backbone.latent_shape
        paths, metas = [], []
        for _ in range(config.trajectories_per_epoch // config.collection_batch):
            call_metas = self._draw_prompts(config.collection_batch)
            with budget.timer("sample"):
                start = torch.randn(len(call_metas), *latent, generator=self.generator)
                path = walks.walk(
                    self.backbone,
                    self.grid,
                    self.times,
                    [m["prompt"] for m in call_metas],
                    start,
                    config.cfg,
                    lambda shape: torch.randn(shape, generator=self.generator),
                )
            budget.nfe += len(call_metas) * len(self.grid)
            paths.append(path)
            metas += call_metas
        prompts = [m["prompt"] for m in metas]
        states = torch.cat([w.states for w in paths])
        with budget.timer("reward"):
            final = states[:, -1]
            reward = decode_and_score(
                self.backbone, {"r": self.reward}, final, prompts, metas, config.decode_chunk
            )
            budget.reward_calls += len(prompts)
            terminal = None
            if config.estimator == "terminal":  # once per trajectory, at collection (spec §B.1)
                terminal = self._reward_grad(final, lambda z, part: z, prompts, metas)
        fresh = Trajectories.rowless(
            prompts,
            metas,
            states=states,
            native=torch.cat([w.native for w in paths]),
            noise=torch.cat([w.noise for w in paths]) if paths[0].noise is not None else None,
            reward=reward["r"].double(),
            terminal_grad=terminal,
        )
        self.collected = fresh
        if config.replay_capacity == 0:
            trajectory, step = self._rows(len(prompts))
            return replace(fresh, trajectory=trajectory, step=step)
        return self._replay(fresh)

    def _replay(self, fresh: Trajectories) -> Trajectories:
        """Push this epoch's trajectories into the buffer (oldest out) and draw the ones to train."""
        parts = [fresh] if self.buffer is None else [self.buffer, fresh]
        joined = Trajectories.cat(parts)
        keep = torch.arange(max(len(joined.prompts) - self.config.replay_capacity, 0), len(joined.prompts))
        self.buffer = joined.select(keep, (joined.trajectory, joined.step))
        count = self.config.trajectories_per_epoch
        drawn = torch.randperm(len(keep), generator=self.generator)[:count]
        return self.buffer.select(drawn, self._rows(count))

    def _rows(self, trajectories: int) -> tuple[Tensor, Tensor]:
        """(trajectory, step) of every training row, each trajectory's rows together."""
        config, steps = self.config, len(self.grid)
        if config.transitions == "all":
            chosen = [torch.arange(steps) for _ in range(trajectories)]
        elif config.transitions == "uniform":
            chosen = [torch.randint(steps, (1,), generator=self.generator) for _ in range(trajectories)]
        else:
            chosen = [
                low_variance_steps(steps, config.timestep_fraction, self.generator)
                for _ in range(trajectories)
            ]
        trajectory = torch.cat([torch.full((len(c),), i) for i, c in enumerate(chosen)])
        return trajectory, torch.cat(chosen)

    # --- training -------------------------------------------------------------------------------
    def microbatches(self, batch: Trajectories, count_multiple: int) -> list[Microbatch]:
        """Trajectories shuffled and split evenly over the ``count_multiple`` updates of the epoch (a
        trajectory's rows all go to one update); each update's rows cut into microbatches of
        ``microbatch_rows``, which only changes memory: the loop averages equal-sized microbatches."""
        count, size = len(batch.prompts), self.config.microbatch_rows
        if count % count_multiple:
            raise ValueError(
                f"{count} trajectories per shard cannot be split over {count_multiple} updates per epoch; "
                "make trajectories_per_epoch a multiple of loop.updates_per_epoch"
            )
        order = torch.randperm(count, generator=self.generator)
        microbatches = []
        for update in order.chunk(count_multiple):
            rows = torch.cat([torch.nonzero(batch.trajectory == i).squeeze(1) for i in update.tolist()])
            if rows.numel() % size:
                raise ValueError(
                    f"an update has {rows.numel()} rows, not a multiple of arm.microbatch_rows={size}; "
                    f"choose a divisor of {rows.numel()}"
                )
            microbatches += [Microbatch(batch, part) for part in rows.split(size)]
        return microbatches

    def _next_x0(self, z: Tensor, step: Tensor, cond, adapter: str | None) -> Tensor:
        """The Tweedie estimate of x_0 at each row's next state z = x_t', by the policy (``POLICY``) or
        the frozen reference (None); after the final step z is x_0 itself (the map is the identity)."""
        last = len(self.grid) - 1
        after = torch.clamp(step + 1, max=last)
        f = self.backbone.native(z, self.times[after], cond, cfg=self.config.cfg, adapter=adapter)
        x0 = self.grid.kernel.point.select(after).x0(z, f)
        final = (step == last).view(-1, *([1] * (z.ndim - 1)))
        return torch.where(final, z, x0)

    def _signal(
        self, batch: Trajectories, index: Tensor, x: Tensor, f_theta: Tensor, cond, prompts, metas
    ) -> Tensor | None:
        """The rows' reward-gradient estimate (see the module docstring)."""
        trajectory, step = batch.trajectory[index], batch.step[index]
        estimator = self.config.estimator
        if estimator == "none":
            return None
        if estimator == "terminal":
            return batch.terminal_grad[trajectory]
        if estimator == "tweedie":
            point = self.grid.kernel.point.select(step)
            f = f_theta.detach()
            return self._reward_grad(x, lambda z, part: point.select(part).x0(z, f[part]), prompts, metas)
        # lookahead: through the current policy at the next state (full Jacobian)
        x_next = batch.states[trajectory, step + 1]
        return self._reward_grad(
            x_next, lambda z, part: self._next_x0(z, step[part], cond[part], POLICY), prompts, metas
        )

    def _row_noise(self, batch: Trajectories, trajectory: Tensor, step: Tensor) -> Tensor | None:
        if batch.noise is None:
            return None
        if self.config.row_noise == "fresh":
            return torch.randn((len(trajectory), *batch.noise.shape[2:]), generator=self.generator)
        return batch.noise[trajectory, step]

    def _aux_field(self, cond, rows: int):
        """(x, time) -> the auxiliary network's output for these rows, or None without one."""
        if self.aux is None:
            return None
        config = self.config
        if config.auxiliary == "value_adapter" and config.value_condition == "empty":
            cond = self.backbone.encode([""] * rows)
        return lambda x, time: self.aux(x, time, cond)

    def loss(self, microbatch: Microbatch) -> tuple[Tensor, dict[str, float]]:
        batch, index, config = microbatch.batch, microbatch.index, self.config
        trajectory, step = batch.trajectory[index], batch.step[index]
        x = batch.states[trajectory, step]
        prompts = [batch.prompts[i] for i in trajectory.tolist()]
        metas = [batch.metas[i] for i in trajectory.tolist()]
        cond = self.backbone.encode(prompts)
        detach_uncond = config.cfg_grad == "detach_uncond"

        def policy_field(z: Tensor, time: Tensor) -> Tensor:
            return self.backbone.native(z, time, cond, cfg=config.cfg, detach_uncond=detach_uncond)

        def reference_field(z: Tensor, time: Tensor) -> Tensor:
            return self.backbone.native(z, time, cond, cfg=config.cfg, adapter=None)

        t = self.times[step]
        f_theta = policy_field(x, t)
        with torch.no_grad():
            f_ref = reference_field(x, t)
        kernel = self.grid.kernel.select(step)
        grad = self._signal(batch, index, x, f_theta, cond, prompts, metas)
        sample_reward = self._sample_reward(prompts, metas)
        rows = Transitions(
            kernel=kernel,
            x=x,
            f_old=batch.native[trajectory, step],
            f_ref=f_ref,
            noise=self._row_noise(batch, trajectory, step),
            reward=batch.reward[trajectory],
            reward_grad=grad,
            steps_remaining=self.grid.steps_remaining[step],
            lookahead_reward=lambda z: sample_reward(self._next_x0(z, step, cond, None)),
            time=t,
            time_next=self.times_next[step],
            policy_field=policy_field,
            reference_field=reference_field,
            aux_field=self._aux_field(cond, len(prompts)),
            sample_reward=sample_reward,
        )
        surrogate = self.objective.loss(f_theta, rows)
        loss = surrogate.loss.mean()
        stats = {
            "loss": float(loss.detach()),
            self.divergence_name: float(self._divergence(kernel, f_theta.detach(), f_ref).mean()),
        }
        if grad is not None:
            stats["reward_grad_norm"] = float(reduce_per_sample(grad.double() ** 2, "sum").sqrt().mean())
        stats |= {name: float(value.double().mean()) for name, value in surrogate.extras.items()}
        return loss, stats

    @property
    def divergence_name(self) -> str:
        """KL for the stochastic sampler; the transition-mean drift for the ODE, which has no KL."""
        return "drift" if self.config.sampler == "ode" else "kl"

    def _divergence(self, kernel, f: Tensor, f_ref: Tensor) -> Tensor:
        """Per row: mean_d (B (f - f_ref))^2, the published transition drift (dt (v - v_ref))^2, or
        the per-element KL of the two kernels, 1/2 mean_d (w (f - f_ref))^2 with w = |B| / nu."""
        shift = kernel.mean(torch.zeros_like(f), f.double() - f_ref.double())
        if self.config.sampler == "ode":
            return reduce_per_sample(shift**2, "mean")
        return 0.5 * reduce_per_sample((shift / per_sample(kernel.nu, shift)) ** 2, "mean")

    def batch_stats(self, batch: Trajectories) -> dict[str, float]:
        """Rewards of this epoch's fresh trajectories (the trained ones may come from the buffer)."""
        reward = self.collected.reward
        return {
            "reward_mean": float(reward.mean()),
            "reward_sq_mean": float((reward**2).mean()),
            "reward_grad_calls": float(self.reward_grad_calls),
        }

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self, part: int = 0, parts: int = 1) -> dict[str, Tensor]:
        """Per test image of this ``part`` of ``parts``: the reward of the policy's sample on the
        training sampler, every extra reward, and the KL (DDPM) or drift (ODE) to the reference
        along that trajectory, averaged over its steps (spec §A.5, §B.6). Each image's noise comes
        from its own generator, so the values do not depend on the split."""
        config = self.config
        metas = [m for m in self.eval_prompts for _ in range(config.eval_images_per_prompt)]
        evaluation = walks.WalkEvaluation(
            self.backbone,
            self.grid,
            self.times,
            config.cfg,
            {"reward": self.reward, **self.eval_extra},
            {self.divergence_name: lambda i, x, f, f_ref: self._divergence(self.grid[i], f, f_ref)},
            config.eval_batch,
            config.decode_chunk,
            config.eval_seed if config.eval_fixed_noise else None,
            self.generator,
        )
        return evaluation(metas, part, parts)

    # --- resume ---------------------------------------------------------------------------------
    def state(self) -> dict:
        buffer = None if self.buffer is None else {"prompts": self.buffer.prompts, "metas": self.buffer.metas}
        return {"calls": self.calls, "reward_grad_calls": self.reward_grad_calls, "buffer": buffer}

    def state_tensors(self) -> dict[str, Tensor]:
        """The replay buffer's trajectories (empty without one)."""
        if self.buffer is None:
            return {}
        return {
            f"buffer.{name}": getattr(self.buffer, name)
            for name in Trajectories.TENSORS
            if getattr(self.buffer, name) is not None
        }

    def load_state(self, state: dict, tensors: dict[str, Tensor]) -> None:
        self.calls, self.reward_grad_calls = state["calls"], state["reward_grad_calls"]
        if state.get("buffer") is not None:
            self.buffer = Trajectories.rowless(
                state["buffer"]["prompts"],
                state["buffer"]["metas"],
                **{name: tensors.get(f"buffer.{name}") for name in Trajectories.TENSORS},
            )
