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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from rsm_core.budget import Budget
from rsm_core.records import RunRecord, load_tensors, load_tensors_metadata, save_tensors_atomic


class Arm(Protocol):
    """One method on one backbone and one data shard: what the loop calls, in this order."""

    generator: torch.Generator  # every random draw of the shard (rollout noise, shuffles)

    def parameters(self) -> list[nn.Parameter]: ...

    def collect(self, budget: Budget) -> Any:
        """Roll out, score and compute advantages; time the "sample" and "reward" phases in budget."""

    def microbatches(self, batch: Any, count_multiple: int) -> list[Any]:
        """The epoch's rows shuffled and cut into a number of microbatches divisible by count_multiple."""

    def loss(self, microbatch: Any) -> tuple[Tensor, dict[str, float]]:
        """The microbatch's scalar loss (the loop averages microbatches and shards) and its stats."""

    def batch_stats(self, batch: Any) -> dict[str, float]:
        """Means over the shard's rows (shards are averaged)."""

    def evaluate(self) -> dict[str, float]:
        """Evaluation with the weights currently loaded (the loop swaps the EMA in)."""

    def state(self) -> dict[str, Any]:
        """JSON-able sampler state beyond the generator (e.g. how many prompt draws were made)."""

    def load_state(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class LoopConfig:
    epochs: int = 150
    lr: float = 3e-4  # constant, no warm-up (spec §10)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    updates_per_epoch: int = 2  # optimizer steps per epoch; the microbatches are split evenly
    ema_every: int = 8  # EMA fires after every 8th optimizer step ...
    ema_max_decay: float = 0.9  # ... with decay min((1 + n) / (10 + n), 0.9)
    # The published loop calls the EMA inside the microbatch loop, so when it fires it applies one
    # update per accumulated microbatch (a burst with the same weights). False: one update per firing.
    ema_burst: bool = True
    eval_every: int = 30  # epochs; also evaluated before training and after the last epoch
    checkpoint_every: int = 10  # epochs


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
    def __init__(self, shards: Sequence[Arm], config: LoopConfig, accelerator: Any = None) -> None:
        """``shards``: this process's arms (sharing one backbone); ``accelerator``: an accelerate
        Accelerator when several processes train together, else None."""
        self.shards, self.config, self.accelerator = list(shards), config, accelerator
        self.processes = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.params = self.shards[0].parameters()
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.lr,
            betas=tuple(config.betas),
            weight_decay=config.weight_decay,
            eps=config.adam_eps,
        )
        self.ema = [p.detach().clone() for p in self.params]
        self.budget = Budget()
        self.epoch = 0
        self.optimizer_steps = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        if self.processes == 1 or not values:
            return values
        stacked = torch.tensor(list(values.values()), dtype=torch.float64)
        return dict(zip(values, self.accelerator.reduce(stacked, "mean").tolist(), strict=True))

    # --- one epoch ------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
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
                        (loss / divisor).backward()
                        for key, value in stats.items():
                            totals[key] = totals.get(key, 0.0) + value / local_microbatches
                self._synchronise_gradients()
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
                totals["grad_norm"] = totals.get("grad_norm", 0.0) + float(norm) / updates
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self._update_ema(accumulation)
        self.epoch += 1
        stats = [arm.batch_stats(b) for arm, b in zip(self.shards, batches, strict=True)]
        row = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]} | totals
        row = self._mean_over_processes(row)
        if "reward_sq_mean" in row:
            row["reward_std"] = max(row.pop("reward_sq_mean") - row["reward_mean"] ** 2, 0.0) ** 0.5
        return {**row, "microbatches": len(plans[0]) * len(self.shards) * self.processes}

    def _synchronise_gradients(self) -> None:
        """Sum the processes' gradients (each already divided by the global microbatch count)."""
        if self.processes == 1:
            return
        for p in self.params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = self.accelerator.reduce(grad, "sum")

    def _update_ema(self, accumulation: int) -> None:
        n = self.optimizer_steps
        self.optimizer_steps += 1
        if (n + 1) % self.config.ema_every:
            return
        decay = min((1 + n) / (10 + n), self.config.ema_max_decay)
        with torch.no_grad():
            for _ in range(accumulation if self.config.ema_burst else 1):
                for e, p in zip(self.ema, self.params, strict=True):
                    e.lerp_(p.detach(), 1 - decay)

    def evaluate(self) -> dict[str, float]:
        """The main process evaluates the EMA weights (identical on every process)."""
        with self.budget.timer("eval"), swapped_in(self.params, self.ema), torch.no_grad():
            return {f"eval_{k}": v for k, v in self.shards[0].evaluate().items()}

    # --- checkpoints ----------------------------------------------------------------------------
    def checkpoint_path(self, run_dir: Path) -> Path:
        """One file per process: the weights are the same everywhere, the shards' RNG states are not."""
        return Path(run_dir) / f"checkpoint-rank{self.rank}.safetensors"

    def save(self, path: Path) -> None:
        tensors = {f"param.{i}": p for i, p in enumerate(self.params)}
        tensors |= {f"ema.{i}": e for i, e in enumerate(self.ema)}
        optimizer = self.optimizer.state_dict()
        for i, state in optimizer["state"].items():
            tensors |= {f"adam.{i}.{k}": torch.as_tensor(v) for k, v in state.items()}
        tensors |= {f"rng.shard{s}": arm.generator.get_state() for s, arm in enumerate(self.shards)}
        tensors["rng.torch"] = torch.get_rng_state()
        bookkeeping = {
            "epoch": self.epoch,
            "optimizer_steps": self.optimizer_steps,
            "adam_groups": optimizer["param_groups"],
            "adam_keys": {str(i): sorted(state) for i, state in optimizer["state"].items()},
            "budget": self.budget.state(),
            "shards": [arm.state() for arm in self.shards],
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
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"param.{i}"])
                self.ema[i].copy_(tensors[f"ema.{i}"])
        state = {
            int(i): {k: tensors[f"adam.{i}.{k}"] for k in keys}
            for i, keys in bookkeeping["adam_keys"].items()
        }
        self.optimizer.load_state_dict({"state": state, "param_groups": bookkeeping["adam_groups"]})
        for s, arm in enumerate(self.shards):
            arm.generator.set_state(tensors[f"rng.shard{s}"])
            arm.load_state(bookkeeping["shards"][s])
        torch.set_rng_state(tensors["rng.torch"])
        self.epoch = bookkeeping["epoch"]
        self.optimizer_steps = bookkeeping["optimizer_steps"]
        self.budget = Budget.from_state(bookkeeping["budget"])

    # --- the run --------------------------------------------------------------------------------
    def _budget_row(self) -> dict[str, float]:
        """Compute over all processes (NFE and reward calls add up; wall-clock is the main process's)."""
        row = self.budget.row()
        if self.processes > 1:
            counts = torch.tensor([row["nfe"], row["reward_calls"]], dtype=torch.float64)
            row["nfe"], row["reward_calls"] = (
                int(v) for v in self.accelerator.reduce(counts, "sum").tolist()
            )
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
            row = {"epoch": 0, **self._budget_row()}
            if self.is_main:
                row |= self.evaluate()
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
            if self.is_main and (
                self.epoch % self.config.eval_every == 0 or self.epoch == self.config.epochs
            ):
                row |= self.evaluate()
            row = {"epoch": self.epoch, **self._budget_row(), **row}
            if record is not None:
                record.log(row)
            if self.epoch % self.config.checkpoint_every == 0 or self.epoch == self.config.epochs:
                self.save(checkpoint)
            bar.update(1)
            bar.set_postfix(reward=f"{row.get('reward_mean', float('nan')):.3f}", refresh=False)
        bar.close()
        if record is not None:
            record.save_tensors("ema.safetensors", {f"ema.{i}": e for i, e in enumerate(self.ema)})
