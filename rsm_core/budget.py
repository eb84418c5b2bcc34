"""Compute accounting: cumulative model calls, reward calls and wall-clock split by phase.

Figures plot reward against any of these, so every run logs them the same way. The counters are
part of a checkpoint, so a resumed run continues the totals of the interrupted one.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

PHASES = ("sample", "reward", "train", "eval")
# What a matched-compute sweep holds equal across its arms (every arm stops at the first epoch that
# reaches it): epochs, guided policy calls, or GPU-hours of training (processes x wall-clock hours)
BudgetKind = Literal["epochs", "nfe", "gpu_hours"]
BUDGET_KINDS = ("epochs", "nfe", "gpu_hours")


@dataclass
class Budget:
    nfe: int = 0  # guided policy calls spent on rollouts (the paper's compute axis)
    reward_calls: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @contextmanager
    def timer(self, phase: str) -> Iterator[None]:
        if phase not in self.seconds:
            raise ValueError(f"unknown phase {phase!r}; choose one of {PHASES}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    @property
    def training_hours(self) -> float:
        """Wall-clock of sampling, reward and training (evaluation excluded, as the published code)."""
        return (self.seconds["sample"] + self.seconds["reward"] + self.seconds["train"]) / 3600

    def row(self) -> dict[str, float | int]:
        return {
            "nfe": self.nfe,
            "reward_calls": self.reward_calls,
            "wallclock_h": self.training_hours,
            # every phase, evaluation included: how the SD1.5 zeroth-order trainers count (spec §5)
            "wallclock_eval_h": sum(self.seconds.values()) / 3600,
            **{f"time_{phase}": seconds for phase, seconds in self.seconds.items()},
        }

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> Budget:
        return cls(state["nfe"], state["reward_calls"], dict(state["seconds"]))


def spent(kind: BudgetKind, epoch: int, row: dict[str, float]) -> float:
    """How much of a ``kind`` budget a run has used after ``epoch`` epochs (``row``: its budget row
    with ``nfe`` and ``gpu_hours``, summed over processes)."""
    if kind not in BUDGET_KINDS:
        raise ValueError(f"unknown budget kind {kind!r}; choose one of {BUDGET_KINDS}")
    return float(epoch) if kind == "epochs" else float(row[kind])


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on a GPU (the CPU's peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory``: tensors allocated on a GPU, or on the CPU the process's
    peak resident set so far (everything the process holds, not only tensors)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
