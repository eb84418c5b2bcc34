"""Numerical faults through the Trainer API with a tiny fake arm: a NaN or inf in a loss or gradient
skips that update (weights and AdamW state as they were), the next update trains, and
``loop.max_nonfinite_updates`` of them in a row stop the run with an error that says what to do; an
epoch whose first microbatch is not on-policy (importance ratio off 1) is warned about and logged."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from rsm_core import checkpoints
from rsm_core.budget import Budget
from rsm_core.interfaces import ParamGroup
from rsm_core.trainer import LoopConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
TARGET = torch.tensor([1.0, -2.0, 0.5])

Snapshot = tuple[Tensor, dict[str, Tensor]]


def snapshot(trainer: Trainer) -> Snapshot:
    """The trained weights and every AdamW state tensor, copied."""
    (state,) = trainer.optimizer.state.values() or [{}]
    return trainer.params[0].detach().clone(), {k: torch.as_tensor(v).clone() for k, v in state.items()}


def same(a: Snapshot, b: Snapshot) -> bool:
    return (
        torch.equal(a[0], b[0])
        and a[1].keys() == b[1].keys()
        and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    )


class RegressionArm:
    """One weight vector regressed to ``TARGET``, one microbatch per update. Microbatch i (counted over
    the run) is made non-finite if i is in ``bad`` (``how``: a NaN loss, an inf loss, or a finite loss
    whose gradient is NaN) and reports ``ratio_deviations[i]`` if given. Before each microbatch's
    loss it snapshots the weights and optimizer state, i.e. the state the previous update left."""

    def __init__(
        self, bad=(), how: str = "nan-loss", ratio_deviations: dict[int, float] | None = None
    ) -> None:
        self.weight = nn.Parameter(torch.zeros(3))
        self.generator = torch.Generator().manual_seed(0)
        self.bad, self.how, self.ratio_deviations = set(bad), how, ratio_deviations or {}
        self.seen = 0
        self.snapshots: list[Snapshot] = []
        self.trainer: Trainer | None = None

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("policy", [self.weight])]

    def collect(self, budget: Budget) -> Tensor:
        return TARGET

    def microbatches(self, batch: Tensor, count_multiple: int) -> list[Tensor]:
        return [batch] * count_multiple

    def loss(self, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        index, self.seen = self.seen, self.seen + 1
        self.snapshots.append(snapshot(self.trainer))
        loss = ((self.weight - target) ** 2).sum()
        if index in self.bad:
            if self.how == "nan-loss":
                loss = loss * float("nan")
            elif self.how == "inf-loss":
                loss = loss * float("inf")
            else:  # d/dw sqrt(|w - w|^2) at 0 is 0/0: a NaN gradient under a finite loss
                loss = loss + ((self.weight - self.weight.detach()) ** 2).sum().sqrt()
        stats = {"loss": float(loss.detach())}
        if index in self.ratio_deviations:
            stats["ratio_deviation"] = self.ratio_deviations[index]
        return loss, stats

    def batch_stats(self, batch: Tensor) -> dict[str, float]:
        return {}

    def evaluate(self, part: int, parts: int) -> dict[str, Tensor]:
        return {"distance": (self.weight.detach() - TARGET).norm().unsqueeze(0)}

    def state(self) -> dict:
        return {"seen": self.seen}

    def state_tensors(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, state: dict, tensors: dict[str, Tensor]) -> None:
        self.seen = state["seen"]


def trainer_of(arm: RegressionArm, **loop) -> Trainer:
    settings = {
        "epochs": 1,
        "lr": 0.1,
        "ema": False,
        "weight_decay": 0.01,
        "eval_every": 1,
        "checkpoint_every": 1,
    }
    arm.trainer = Trainer([arm], LoopConfig(**(settings | loop)))
    return arm.trainer


@pytest.mark.parametrize("how", ["nan-loss", "inf-loss", "nan-gradient"])
def test_a_non_finite_update_is_skipped_and_the_next_one_trains(how) -> None:
    arm = RegressionArm(bad={1}, how=how)
    trainer = trainer_of(arm, updates_per_epoch=3)
    with pytest.warns(UserWarning, match="skipped"):
        row = trainer.train_epoch()
    assert row["skipped_updates"] == 1
    first, skipped, after = arm.snapshots  # the states before updates 0, 1 (non-finite) and 2
    assert not same(first, skipped)  # update 0 trained
    assert same(skipped, after)  # update 1 changed neither the weights nor AdamW's moments or step
    assert not same(after, snapshot(trainer)) and torch.isfinite(trainer.params[0]).all()  # update 2 trained
    clean = RegressionArm()  # the same run without the bad microbatch: two updates
    trainer_of(clean, updates_per_epoch=2).train_epoch()
    assert same(snapshot(clean.trainer), snapshot(trainer))


def test_non_finite_updates_in_a_row_stop_the_run_and_its_checkpoint_is_the_last_good_state(tmp_path) -> None:
    arm = RegressionArm(bad=range(1, 100))  # everything after the first update
    trainer = trainer_of(arm, epochs=10, updates_per_epoch=2, max_nonfinite_updates=3)
    with pytest.warns(UserWarning, match="skipped"), pytest.raises(RuntimeError) as failure:
        trainer.run(tmp_path, None, progress=False)
    message = str(failure.value)
    assert "3 updates in a row" in message and "loop.max_nonfinite_updates" in message
    assert arm.seen == 4  # updates 1, 2 and 3 in a row: stopped in epoch 2
    resumed = RegressionArm()
    trainer_of(resumed, epochs=10, updates_per_epoch=2).load(checkpoints.latest(tmp_path))
    assert same(snapshot(resumed.trainer), arm.snapshots[1])  # epoch 1 as its good update left it


def test_a_finite_update_ends_the_streak() -> None:
    arm = RegressionArm(bad={1, 2, 4, 5})
    trainer = trainer_of(arm, epochs=4, updates_per_epoch=2, max_nonfinite_updates=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skipped = [trainer.train_epoch()["skipped_updates"] for _ in range(4)]
    assert skipped == [1, 1, 2, 0]


def test_an_off_policy_first_microbatch_is_warned_about_and_logged() -> None:
    trainer = trainer_of(RegressionArm(ratio_deviations={0: 0.05, 1: 0.0}), updates_per_epoch=2)
    with pytest.warns(UserWarning) as caught:
        row = trainer.train_epoch()
    assert row["first_ratio_deviation"] == 0.05
    messages = [str(w.message) for w in caught]
    assert any("precision" in m and "first_ratio_deviation" in m and "0.05" in m for m in messages), messages


def test_only_the_first_microbatch_is_held_on_policy() -> None:
    """Later microbatches follow an update, so their ratios may leave 1."""
    trainer = trainer_of(RegressionArm(ratio_deviations={0: 0.0, 1: 0.05}), updates_per_epoch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = trainer.train_epoch()
    assert row["first_ratio_deviation"] == 0.0
