"""Compute accounting: cumulative model calls, reward calls and wall-clock split by phase.

Figures plot reward against any of these, so every run logs them the same way. The counters are
part of a checkpoint, so a resumed run continues the totals of the interrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

PHASES = ("sample", "reward", "train", "eval")


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
            **{f"time_{phase}": seconds for phase, seconds in self.seconds.items()},
        }

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> Budget:
        return cls(state["nfe"], state["reward_calls"], dict(state["seconds"]))
