"""The shared training loop: collect -> reward -> advantage -> updates, for every method.

A method plugs in as an ``Arm`` (its rollout, its loss, its evaluation); the loop owns what every
method shares: AdamW with grad-norm clipping and gradient accumulation, data parallelism, the EMA of
the trained weights used for evaluation, one metrics row per epoch with the compute budget, and
checkpoints that resume a killed run exactly (same command, same metrics).

Data parallelism is by shards: each shard is one arm with its own seed offset and prompt slots, as
one GPU of the published trainer. A process runs its local shards one after another and averages
their gradients; with accelerate the processes' gradients are averaged too. So W processes with one
shard each and one process with W shards compute the same update (tests/test_distributed.py), which
is also how the 1gpu scale fits a 2-GPU recipe on one device.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from rsm_core import checkpoints
from rsm_core.budget import BUDGET_KINDS, Budget, BudgetKind, peak_memory_gib, reset_peak_memory, spent
from rsm_core.collectives import Collectives
from rsm_core.config import require
from rsm_core.interfaces import Arm, ParamGroup
from rsm_core.records import RunRecord, load_tensors, load_tensors_metadata, save_tensors_atomic


class NonFiniteUpdates(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient: the run cannot recover alone."""


EmaTiming = Literal["before_step", "after_step"]


@dataclass(frozen=True)
class LoopConfig:
    epochs: int = 150
    # the policy group's optimiser (an arm's other groups may set their own lr, decay and clip)
    lr: float = 3e-4  # constant, no warm-up (spec §10)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # per parameter group; 0 or less: no clip
    updates_per_epoch: int = 2  # optimizer steps per epoch; the microbatches are split evenly
    ema: bool = True  # evaluate (and save) an EMA of the trained weights
    ema_every: int = 8  # EMA fires at every 8th optimizer step ...
    ema_max_decay: float = 0.9  # ... with decay min((1 + n) / (10 + n), 0.9), n = steps taken
    # The published loop calls the EMA inside the microbatch loop, so when it fires it applies one
    # update per accumulated microbatch (a burst with the same weights). False: one update per firing.
    ema_burst: bool = True
    # "before_step": the published order, the EMA averages the weights from before the optimizer step
    # that fires it; "after_step": it averages the weights that step produced (the textbook order).
    ema_timing: EmaTiming = "before_step"
    eval_every: int = 30  # epochs; also evaluated before training and after the last epoch
    checkpoint_every: int = 10  # epochs
    # also checkpoint at the first epoch end this many minutes after the last checkpoint (0: off), so
    # a job killed without warning loses at most about this much work
    checkpoint_minutes: float = 0.0
    # The compute budget a matched sweep holds equal: the run stops at the first epoch that reaches
    # budget_limit of budget_kind (epochs, NFE, or GPU-hours = processes x training wall-clock hours);
    # 0: no limit besides ``epochs``, which stays a cap either way.
    budget_kind: BudgetKind = "epochs"
    budget_limit: float = 0.0
    # An update whose loss or gradient is NaN or inf is skipped (weights and AdamW state unchanged)
    # and counted in the row's ``skipped_updates``; this many in a row stop the run with an error. The
    # step counter and the EMA's schedule advance as for a step fp16 loss scaling skips (the EMA then
    # averages unchanged weights), so a skip does not shift when later EMA updates fire.
    max_nonfinite_updates: int = 10
    # The first microbatch of an epoch is on-policy: its importance ratio must be 1. A deviation
    # beyond this (a rollout and a training forward in different precisions or batch layouts: the
    # pitfall Flow-GRPO's users report) is warned about and logged as ``first_ratio_deviation``.
    ratio_tolerance: float = 1e-3

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "epochs", "must be at least 1 (a run trains at least one epoch)")
        counts = ("updates_per_epoch", "ema_every", "eval_every", "checkpoint_every", "max_nonfinite_updates")
        for name in counts:
            require(getattr(self, name) >= 1, name, "must be at least 1")
        require(self.lr > 0, "lr", "must be positive")
        require(self.weight_decay >= 0, "weight_decay", "must not be negative")
        require(0 <= self.ema_max_decay < 1, "ema_max_decay", "must lie in [0, 1)")
        require(self.ema_timing in ("before_step", "after_step"), "ema_timing", "before_step or after_step")
        require(all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2, "betas", "two values in [0, 1)")
        require(self.checkpoint_minutes >= 0, "checkpoint_minutes", "must not be negative (0 = off)")
        require(self.budget_kind in BUDGET_KINDS, "budget_kind", f"one of {BUDGET_KINDS}")
        require(self.budget_limit >= 0, "budget_limit", "must not be negative (0 = only the epochs)")
        require(self.ratio_tolerance > 0, "ratio_tolerance", "must be positive")


@dataclass
class _Group:
    """A parameter group with the loop's defaults filled in, and its EMA (if kept)."""

    spec: ParamGroup
    lr: float
    weight_decay: float
    max_grad_norm: float
    ema: list[Tensor] | None

    @property
    def params(self) -> list[nn.Parameter]:
        return self.spec.params


@contextmanager
def swapped_in(parameters: Sequence[nn.Parameter], values: Sequence[Tensor]) -> Iterator[None]:
    """Temporarily load ``values`` (e.g. the EMA) into ``parameters``."""
    saved = [p.detach().clone() for p in parameters]
    with torch.no_grad():
        for p, v in zip(parameters, values, strict=True):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(parameters, saved, strict=True):
                p.copy_(v)


class Trainer:
    def __init__(
        self, shards: Sequence[Arm], config: LoopConfig, accelerator: Any = None, loss_scaling: bool = False
    ) -> None:
        """``shards``: this process's arms (sharing one backbone); ``accelerator``: an accelerate
        Accelerator when several processes train together, else None; ``loss_scaling``: dynamic loss
        scaling for fp16 forwards (as accelerate's fp16 mode does in the published code), so small
        gradients do not underflow; a step whose gradients overflow is skipped."""
        self.shards, self.config = list(shards), config
        self.collectives = Collectives(accelerator)
        self.processes, self.rank = self.collectives.processes, self.collectives.rank
        self.groups = [self._group(spec) for spec in self.shards[0].param_groups()]
        names = [g.spec.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"parameter group names must be unique, got {names}")
        self.optimizer = torch.optim.AdamW(
            [{"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay} for g in self.groups],
            betas=tuple(config.betas),
            eps=config.adam_eps,
        )
        self.scaler = torch.amp.GradScaler(self.collectives.device.type) if loss_scaling else None
        self.budget = Budget()
        self.epoch = 0
        self.optimizer_steps = 0
        self.nonfinite_streak = 0  # updates in a row skipped for a non-finite loss or gradient

    def _group(self, spec: ParamGroup) -> _Group:
        config = self.config
        keep_ema = config.ema if spec.ema is None else spec.ema
        return _Group(
            spec,
            lr=config.lr if spec.lr is None else spec.lr,
            weight_decay=config.weight_decay if spec.weight_decay is None else spec.weight_decay,
            max_grad_norm=config.max_grad_norm if spec.max_grad_norm is None else spec.max_grad_norm,
            ema=[p.detach().clone() for p in spec.params] if keep_ema else None,
        )

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for g in self.groups for p in g.params]

    @property
    def is_main(self) -> bool:
        return self.collectives.is_main

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        if not values:
            return values
        stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=self.collectives.device)
        return dict(zip(values, self.collectives.reduce(stacked, "mean").tolist(), strict=True))

    # --- one epoch ------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        device = self._model_device()
        reset_peak_memory(device)
        batches = [arm.collect(self.budget) for arm in self.shards]
        updates = self.config.updates_per_epoch
        with self.budget.timer("train"):
            plans = [arm.microbatches(b, updates) for arm, b in zip(self.shards, batches, strict=True)]
            if len({len(plan) for plan in plans}) != 1:
                raise RuntimeError("every shard must cut its rows into the same number of microbatches")
            accumulation = len(plans[0]) // updates
            divisor = accumulation * len(self.shards) * self.processes  # microbatches per update, globally
            local_microbatches = len(plans[0]) * len(self.shards)
            totals: dict[str, float] = {"skipped_updates": 0.0}
            first_stats: dict[str, float] | None = None
            for update in range(updates):
                losses_finite = True
                for arm, plan in zip(self.shards, plans, strict=True):
                    for microbatch in plan[update * accumulation : (update + 1) * accumulation]:
                        loss, stats = arm.loss(microbatch)
                        first_stats = stats if first_stats is None else first_stats
                        losses_finite &= bool(torch.isfinite(loss.detach()).all())
                        share = loss / divisor
                        (self.scaler.scale(share) if self.scaler else share).backward()
                        for key, value in stats.items():
                            totals[key] = totals.get(key, 0.0) + value / local_microbatches
                self._synchronise_gradients()
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)  # clip and log the true gradients
                finite = self._finite_update(losses_finite)
                if finite:
                    for group in self.groups:
                        norm = self._clip(group)
                        key = "grad_norm" if group is self.groups[0] else f"grad_norm_{group.spec.name}"
                        totals[key] = totals.get(key, 0.0) + norm / updates
                else:
                    totals["skipped_updates"] += 1
                if self.config.ema_timing == "before_step":
                    self._update_ema(accumulation)
                if self.scaler:
                    self.scaler.step(self.optimizer)  # skipped if a gradient is inf or nan
                    self.scaler.update()
                elif finite:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.config.ema_timing == "after_step":
                    self._update_ema(accumulation)
                self.optimizer_steps += 1
        self.epoch += 1
        totals |= self._check_on_policy_ratio(first_stats or {})
        stats = [arm.batch_stats(b) for arm, b in zip(self.shards, batches, strict=True)]
        row = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]} | totals
        row["peak_memory_gib"] = peak_memory_gib(device)
        row = self._mean_over_processes(row)
        if "reward_sq_mean" in row:
            row["reward_std"] = max(row.pop("reward_sq_mean") - row["reward_mean"] ** 2, 0.0) ** 0.5
        return {**row, "microbatches": len(plans[0]) * len(self.shards) * self.processes}

    def _finite_update(self, losses_finite: bool) -> bool:
        """Whether this update's losses (on every process) and summed gradients are finite; a
        non-finite one is skipped, and ``max_nonfinite_updates`` of them in a row stop the run."""
        grads = [p.grad.detach().isfinite().all() for p in self.params if p.grad is not None]
        finite = bool(torch.stack(grads).all()) if grads else True  # summed: the same on every process
        finite = not self.collectives.any(not (finite and losses_finite))
        if finite:
            self.nonfinite_streak = 0
            return True
        self.nonfinite_streak += 1
        limit = self.config.max_nonfinite_updates
        warnings.warn(
            f"epoch {self.epoch + 1}: an update had a NaN or inf loss or gradient and was skipped "
            f"({self.nonfinite_streak} in a row; the run stops at {limit})",
            stacklevel=3,
        )
        if self.nonfinite_streak >= limit:
            raise NonFiniteUpdates(
                f"{limit} updates in a row had a NaN or inf loss or gradient (epoch {self.epoch + 1}); the "
                f"run stopped. Lower loop.lr, check the reward for NaN or inf values, or raise "
                f"loop.max_nonfinite_updates; rerunning resumes from the last checkpoint"
            )
        return False

    def _check_on_policy_ratio(self, first: dict[str, float]) -> dict[str, float]:
        """The first microbatch's ``ratio_deviation`` (max |rho - 1| over its rows, from arms that
        train through an importance ratio), warned about beyond ``ratio_tolerance``."""
        if "ratio_deviation" not in first:
            return {}
        deviation = first["ratio_deviation"]
        if not deviation <= self.config.ratio_tolerance:
            warnings.warn(
                f"epoch {self.epoch}, rank {self.rank}: the importance ratio of the epoch's first "
                f"microbatch is off 1 by {deviation:.3g} (loop.ratio_tolerance "
                f"{self.config.ratio_tolerance:g}) although the policy has not changed since the rollout: "
                "the rollout and the training forward differ (precision, autocast, batch layout); logged "
                "as first_ratio_deviation",
                stacklevel=3,
            )
        return {"first_ratio_deviation": deviation}

    def _model_device(self) -> torch.device:
        """Where the trained weights live (the accelerator's device, or the model's on one GPU)."""
        return self.params[0].device if self.params else self.collectives.device

    @staticmethod
    def _clip(group: _Group) -> float:
        """The group's gradient norm before clipping (clipped to its own max_grad_norm if positive)."""
        if group.max_grad_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(group.params, group.max_grad_norm))
        grads = [p.grad.detach().norm() for p in group.params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def _synchronise_gradients(self) -> None:
        """Sum the processes' gradients (each already divided by the global microbatch count)."""
        if self.processes == 1:
            return  # a parameter without a gradient keeps None: AdamW then skips it, decay included
        for p in self.params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = self.collectives.reduce(grad, "sum")

    def _update_ema(self, accumulation: int) -> None:
        """The published rule: at optimizer step m (1-based) with m % ema_every == 0, ema <- ema +
        (1 - d)(param - ema), d = min((1 + n)/(10 + n), max), n = m - 1 steps taken before it."""
        n = self.optimizer_steps
        if (n + 1) % self.config.ema_every:
            return
        decay = min((1 + n) / (10 + n), self.config.ema_max_decay)
        with torch.no_grad():
            for _ in range(accumulation if self.config.ema_burst else 1):
                for group in self.groups:
                    for e, p in zip(group.ema or [], group.params, strict=False):
                        e.lerp_(p.detach(), 1 - decay)

    def evaluated_weights(self) -> AbstractContextManager[None]:
        """The weights evaluation uses, swapped in: the EMA (identical on every process), or the
        trained weights of groups that keep no EMA."""
        params = [p for g in self.groups if g.ema is not None for p in g.params]
        emas = [e for g in self.groups if g.ema is not None for e in g.ema]
        return swapped_in(params, emas)

    def evaluate(self) -> dict[str, float]:
        """Every process evaluates its part of the test set; the row holds the mean and the spread
        of each value over the whole set (``eval_<name>``, ``eval_<name>_std``)."""
        with self.budget.timer("eval"), self.evaluated_weights(), torch.no_grad():
            parts = self.shards[0].evaluate(self.rank, self.processes)
        row: dict[str, float] = {}
        for name, values in parts.items():
            every = self.collectives.gather(values.to(self.collectives.device, torch.float64)).cpu()
            spread = float(every.std()) if every.numel() > 1 else float("nan")  # one image has none
            row[f"eval_{name}"], row[f"eval_{name}_std"] = float(every.mean()), spread
        return row

    # --- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, run_dir: Path) -> None:
        """This epoch's checkpoint, consistent across processes (rsm_core.checkpoints): every rank
        writes its file, they meet, rank 0 commits the manifest."""
        checkpoints.write_rank(run_dir, self.epoch, self.rank, self.save)
        self.collectives.barrier()
        if self.is_main:
            checkpoints.commit(run_dir, self.epoch, self.processes)
        self.collectives.barrier()

    def save(self, path: Path) -> None:
        tensors: dict[str, Tensor] = {}
        for group in self.groups:
            name = group.spec.name
            tensors |= {f"param.{name}.{i}": p for i, p in enumerate(group.params)}
            tensors |= {f"ema.{name}.{i}": e for i, e in enumerate(group.ema or [])}
        optimizer = self.optimizer.state_dict()
        for i, state in optimizer["state"].items():
            tensors |= {f"adam.{i}.{k}": torch.as_tensor(v) for k, v in state.items()}
        tensors |= {f"rng.shard{s}": arm.generator.get_state() for s, arm in enumerate(self.shards)}
        for s, arm in enumerate(self.shards):
            tensors |= {f"shard{s}.{name}": value for name, value in arm.state_tensors().items()}
        tensors["rng.torch"] = torch.get_rng_state()
        bookkeeping = {
            "epoch": self.epoch,
            "optimizer_steps": self.optimizer_steps,
            "nonfinite_streak": self.nonfinite_streak,
            "groups": {g.spec.name: {"params": len(g.params), "ema": g.ema is not None} for g in self.groups},
            "adam_groups": optimizer["param_groups"],
            "adam_keys": {str(i): sorted(state) for i, state in optimizer["state"].items()},
            "budget": self.budget.state(),
            "shards": [arm.state() for arm in self.shards],
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }
        save_tensors_atomic(path, tensors, {"bookkeeping": json.dumps(bookkeeping)})

    def load(self, path: Path) -> None:
        tensors = load_tensors(path)
        bookkeeping = json.loads(load_tensors_metadata(path)["bookkeeping"])
        if len(bookkeeping["shards"]) != len(self.shards):
            raise RuntimeError(
                f"{path} holds {len(bookkeeping['shards'])} shards but this process runs {len(self.shards)}; "
                "resume with the same number of processes and shards"
            )
        expected = {g.spec.name: {"params": len(g.params), "ema": g.ema is not None} for g in self.groups}
        if bookkeeping.get("groups") != expected:
            raise RuntimeError(
                f"{path} holds the parameter groups {bookkeeping.get('groups')} but this run trains "
                f"{expected}; resume with the same method and config"
            )
        with torch.no_grad():
            for group in self.groups:
                name = group.spec.name
                for i, p in enumerate(group.params):
                    p.copy_(tensors[f"param.{name}.{i}"])
                for i, e in enumerate(group.ema or []):
                    e.copy_(tensors[f"ema.{name}.{i}"])
        state = {
            int(i): {k: tensors[f"adam.{i}.{k}"] for k in keys}
            for i, keys in bookkeeping["adam_keys"].items()
        }
        self.optimizer.load_state_dict({"state": state, "param_groups": bookkeeping["adam_groups"]})
        for s, arm in enumerate(self.shards):
            arm.generator.set_state(tensors[f"rng.shard{s}"])
            prefix = f"shard{s}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            arm.load_state(bookkeeping["shards"][s], own)
        torch.set_rng_state(tensors["rng.torch"])
        self.epoch = bookkeeping["epoch"]
        self.optimizer_steps = bookkeeping["optimizer_steps"]
        self.nonfinite_streak = bookkeeping.get("nonfinite_streak", 0)
        self.budget = Budget.from_state(bookkeeping["budget"])
        if self.scaler:
            self.scaler.load_state_dict(bookkeeping["scaler"])

    # --- the run --------------------------------------------------------------------------------
    def _budget_row(self) -> dict[str, float]:
        """Compute over all processes (NFE and reward calls add up; wall-clock is the main process's)."""
        row = self.budget.row()
        counts = torch.tensor(
            [row["nfe"], row["reward_calls"]], dtype=torch.float64, device=self.collectives.device
        )
        row["nfe"], row["reward_calls"] = (int(v) for v in self.collectives.reduce(counts, "sum").tolist())
        row["gpu_hours"] = row["wallclock_h"] * self.processes
        return row

    def finished(self, budget: dict[str, float] | None = None) -> bool:
        """Whether the run has trained its epochs or spent its compute budget (the same answer on
        every process: GPU-hours follow each process's own clock)."""
        config = self.config
        done = self.epoch >= config.epochs
        if config.budget_limit > 0:
            row = budget if budget is not None else self._budget_row()
            done |= spent(config.budget_kind, self.epoch, row) >= config.budget_limit
        return self.collectives.any(done)

    def run(
        self,
        run_dir: Path,
        record: RunRecord | None,
        progress: bool = True,
        should_stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Train until ``finished`` with one metrics row per epoch (``record`` on the main process
        only), resuming from the run's committed checkpoint. ``should_stop`` (e.g. a preemption
        signal arrived) is asked after every epoch: when any process says yes, the run checkpoints
        that epoch and returns False; True when it has finished."""
        checkpoint = checkpoints.verified(run_dir, self.rank, self.processes)
        if checkpoint is not None:
            self.load(checkpoint)
        if record is not None:
            # rows an interrupted run logged after its last checkpoint are redone, not duplicated
            record.truncate_metrics(keep=lambda row: checkpoint is not None and row["epoch"] <= self.epoch)
        if checkpoint is None:
            row = {"epoch": 0, **self._budget_row(), **self.evaluate()}
            if record is not None:
                record.log(row)
        last_checkpoint = time.monotonic()
        bar = tqdm(
            total=self.config.epochs,
            initial=self.epoch,
            desc=Path(run_dir).name,
            unit="epoch",
            disable=not (progress and self.is_main),
        )
        stopped = False
        while not stopped and not self.finished():
            row = self.train_epoch()
            done = self.finished(self._budget_row())
            stopped = not done and self.collectives.any(should_stop is not None and should_stop())
            if self.epoch % self.config.eval_every == 0 or done:
                row |= self.evaluate()  # every process evaluates its part
            row = {"epoch": self.epoch, **self._budget_row(), **row}
            if record is not None:
                record.log(row)
            minutes = self.config.checkpoint_minutes
            overdue = minutes > 0 and time.monotonic() - last_checkpoint >= 60 * minutes
            due = done or stopped or self.epoch % self.config.checkpoint_every == 0
            if due or self.collectives.any(overdue):
                self.save_checkpoint(run_dir)
                last_checkpoint = time.monotonic()
            bar.update(1)
            bar.set_postfix(reward=f"{row.get('reward_mean', float('nan')):.3f}", refresh=False)
        bar.close()
        if stopped:
            return False
        if record is not None:
            final = {
                f"{g.spec.name}.{i}": v
                for g in self.groups
                for i, v in enumerate(g.ema if g.ema is not None else g.params)
            }
            record.save_tensors("weights.safetensors", final)  # what evaluation used: EMA where kept
        return True
