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
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from rsm_core.budget import Budget, peak_memory_gib, reset_peak_memory
from rsm_core.collectives import Collectives
from rsm_core.config import require
from rsm_core.interfaces import Arm, ParamGroup
from rsm_core.records import RunRecord, load_tensors, load_tensors_metadata, save_tensors_atomic

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

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "epochs", "must be at least 1 (a run trains at least one epoch)")
        for name in ("updates_per_epoch", "ema_every", "eval_every", "checkpoint_every"):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        require(self.lr > 0, "lr", "must be positive")
        require(self.weight_decay >= 0, "weight_decay", "must not be negative")
        require(0 <= self.ema_max_decay < 1, "ema_max_decay", "must lie in [0, 1)")
        require(self.ema_timing in ("before_step", "after_step"), "ema_timing", "before_step or after_step")
        require(all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2, "betas", "two values in [0, 1)")


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
            totals: dict[str, float] = {}
            for update in range(updates):
                for arm, plan in zip(self.shards, plans, strict=True):
                    for microbatch in plan[update * accumulation : (update + 1) * accumulation]:
                        loss, stats = arm.loss(microbatch)
                        share = loss / divisor
                        (self.scaler.scale(share) if self.scaler else share).backward()
                        for key, value in stats.items():
                            totals[key] = totals.get(key, 0.0) + value / local_microbatches
                self._synchronise_gradients()
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)  # clip and log the true gradients
                for group in self.groups:
                    norm = self._clip(group)
                    key = "grad_norm" if group is self.groups[0] else f"grad_norm_{group.spec.name}"
                    totals[key] = totals.get(key, 0.0) + norm / updates
                if self.config.ema_timing == "before_step":
                    self._update_ema(accumulation)
                if self.scaler:
                    self.scaler.step(self.optimizer)  # skipped if a gradient is inf or nan
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.config.ema_timing == "after_step":
                    self._update_ema(accumulation)
                self.optimizer_steps += 1
        self.epoch += 1
        stats = [arm.batch_stats(b) for arm, b in zip(self.shards, batches, strict=True)]
        row = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]} | totals
        row["peak_memory_gib"] = peak_memory_gib(device)
        row = self._mean_over_processes(row)
        if "reward_sq_mean" in row:
            row["reward_std"] = max(row.pop("reward_sq_mean") - row["reward_mean"] ** 2, 0.0) ** 0.5
        return {**row, "microbatches": len(plans[0]) * len(self.shards) * self.processes}

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
    def checkpoint_path(self, run_dir: Path) -> Path:
        """One file per process: the weights are the same everywhere, the shards' RNG states are not."""
        return Path(run_dir) / f"checkpoint-rank{self.rank}.safetensors"

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
        return row

    def run(self, run_dir: Path, record: RunRecord | None, progress: bool = True) -> None:
        """Train to ``config.epochs`` with one metrics row per epoch (``record`` on the main process
        only); resumes from this process's checkpoint in ``run_dir``."""
        checkpoint = self.checkpoint_path(run_dir)
        if checkpoint.exists():
            self.load(checkpoint)
        if record is not None:
            # rows an interrupted run logged after its last checkpoint are redone, not duplicated
            record.truncate_metrics(keep=lambda row: checkpoint.exists() and row["epoch"] <= self.epoch)
        if not checkpoint.exists():
            row = {"epoch": 0, **self._budget_row(), **self.evaluate()}
            if record is not None:
                record.log(row)
        bar = tqdm(
            total=self.config.epochs,
            initial=self.epoch,
            desc=Path(run_dir).name,
            unit="epoch",
            disable=not (progress and self.is_main),
        )
        while self.epoch < self.config.epochs:
            row = self.train_epoch()
            if self.epoch % self.config.eval_every == 0 or self.epoch == self.config.epochs:
                row |= self.evaluate()  # every process evaluates its part
            row = {"epoch": self.epoch, **self._budget_row(), **row}
            if record is not None:
                record.log(row)
            if self.epoch % self.config.checkpoint_every == 0 or self.epoch == self.config.epochs:
                self.save(checkpoint)
            bar.update(1)
            bar.set_postfix(reward=f"{row.get('reward_mean', float('nan')):.3f}", refresh=False)
        bar.close()
        if record is not None:
            final = {
                f"{g.spec.name}.{i}": v
                for g in self.groups
                for i, v in enumerate(g.ema if g.ema is not None else g.params)
            }
            record.save_tensors("weights.safetensors", final)  # what evaluation used: EMA where kept
