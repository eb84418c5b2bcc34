"""Stopping and resuming a run: a stop request (preemption) checkpoints the epoch and the resumed run
logs what an uninterrupted one logs; the compute budget stops every arm at the same spend; the
checkpoint's manifest refuses files from another epoch or another number of processes; checkpoints
also come every few minutes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from experiments.smoke_reference import UNTIMED
from rsm_core import checkpoints
from rsm_core import trainer as trainer_module
from rsm_core.budget import Budget
from rsm_core.interfaces import ParamGroup
from rsm_core.records import RunRecord, read_metrics
from rsm_core.trainer import LoopConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


class LinearArm:
    """The cheapest arm the loop can drive: a linear policy regressing noisy targets, 8 NFE per epoch."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.policy = nn.Linear(3, 1)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.draws = 0

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("policy", list(self.policy.parameters()))]

    def collect(self, budget: Budget) -> Tensor:
        self.draws += 1
        budget.nfe += 8
        return torch.randn(8, 4, generator=self.generator)

    def microbatches(self, batch: Tensor, count_multiple: int) -> list[Tensor]:
        return list(batch.chunk(2 * count_multiple))

    def loss(self, microbatch: Tensor) -> tuple[Tensor, dict[str, float]]:
        loss = ((self.policy(microbatch[:, :3]).squeeze(1) - microbatch[:, 3]) ** 2).mean()
        return loss, {"loss": float(loss.detach())}

    def batch_stats(self, batch: Tensor) -> dict[str, float]:
        return {"reward_mean": float(batch.mean())}

    def evaluate(self, part: int, parts: int) -> dict[str, Tensor]:
        return {"reward": self.policy.weight.detach().double().flatten()}

    def state(self) -> dict:
        return {"draws": self.draws}

    def state_tensors(self) -> dict:
        return {}

    def load_state(self, state: dict, tensors: dict) -> None:
        self.draws = state["draws"]


LOOP = LoopConfig(epochs=4, lr=1e-2, updates_per_epoch=2, eval_every=2, checkpoint_every=10)


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(UNTIMED)} for row in rows]


def train(run_dir: Path, loop: LoopConfig = LOOP, should_stop=None) -> tuple[bool, Trainer]:
    record = RunRecord.create_or_resume(run_dir.parent, run_dir.name, {"loop": "test"}, wandb=False)
    trainer = Trainer([LinearArm()], loop)
    finished = trainer.run(run_dir, record, progress=False, should_stop=should_stop)
    return finished, trainer


def test_a_stop_request_checkpoints_the_epoch_and_the_resumed_run_logs_the_same_rows(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert train(straight)[0]
    stopped = tmp_path / "stopped"
    finished, trainer = train(stopped, should_stop=lambda: True)  # e.g. SIGUSR1 during the first epoch
    assert not finished and trainer.epoch == 1
    assert checkpoints.read_manifest(stopped)["epoch"] == 1  # written although checkpoint_every is 10
    assert len(read_metrics(stopped, allow_incomplete=True)) == 2  # epoch 0 and the finished epoch 1
    assert train(stopped)[0]
    assert untimed(read_metrics(stopped, allow_incomplete=True)) == untimed(
        read_metrics(straight, allow_incomplete=True)
    )


@pytest.mark.parametrize(
    ("kind", "limit", "epochs"),
    [("epochs", 3, 3), ("nfe", 20, 3), ("nfe", 16, 2), ("gpu_hours", 1e-12, 1)],  # 8 NFE per epoch
)
def test_the_budget_stops_the_run_at_the_first_epoch_that_reaches_it(
    tmp_path: Path, kind: str, limit: float, epochs: int
) -> None:
    loop = LoopConfig(**{**LOOP.__dict__, "epochs": 10, "budget_kind": kind, "budget_limit": limit})
    finished, trainer = train(tmp_path / "run", loop)
    rows = read_metrics(tmp_path / "run", allow_incomplete=True)
    assert finished and trainer.epoch == epochs
    assert [row["epoch"] for row in rows] == list(range(epochs + 1))
    assert "eval_reward" in rows[-1], "the last epoch of a budget-stopped run is evaluated"
    assert checkpoints.read_manifest(tmp_path / "run")["epoch"] == epochs
    assert rows[-1]["gpu_hours"] == rows[-1]["wallclock_h"]  # one process


def test_a_finished_budget_is_not_trained_further_on_rerun(tmp_path: Path) -> None:
    loop = LoopConfig(**{**LOOP.__dict__, "epochs": 10, "budget_kind": "nfe", "budget_limit": 16})
    train(tmp_path / "run", loop)
    _, again = train(tmp_path / "run", loop)
    assert again.epoch == 2 and len(read_metrics(tmp_path / "run", allow_incomplete=True)) == 3


def test_the_manifest_is_the_commit_point(tmp_path: Path) -> None:
    """A process killed after writing its file but before the manifest leaves the last checkpoint."""
    run_dir = tmp_path / "run"
    train(run_dir, should_stop=lambda: True)
    trainer = Trainer([LinearArm()], LOOP)
    trainer.epoch = 7
    checkpoints.write_rank(run_dir, 7, 0, trainer.save)  # no commit: the kill came before it
    assert checkpoints.verified(run_dir, 0, 1) == checkpoints.rank_file(run_dir, 1, 0)


def test_a_resume_refuses_another_process_count_and_a_damaged_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(run_dir, should_stop=lambda: True)
    with pytest.raises(checkpoints.CheckpointMismatch, match="written by 1 processes and this run has 2"):
        checkpoints.verified(run_dir, 0, 2)
    path = checkpoints.latest(run_dir)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoints.CheckpointMismatch, match="does not match the sha256"):
        checkpoints.verified(run_dir, 0, 1)


def test_commit_refuses_ranks_of_different_epochs(tmp_path: Path) -> None:
    trainer = Trainer([LinearArm()], LOOP)
    for rank, epoch in ((0, 3), (1, 2)):
        trainer.epoch = epoch
        checkpoints.write_rank(tmp_path, epoch, rank, trainer.save)
    with pytest.raises(checkpoints.CheckpointMismatch, match="rank 1 wrote no checkpoint for epoch 3"):
        checkpoints.commit(tmp_path, 3, 2)
    assert checkpoints.read_manifest(tmp_path) is None


def test_checkpoints_come_every_few_minutes_as_well(tmp_path: Path, monkeypatch) -> None:
    clock = iter(range(0, 10**6, 600))  # every reading of the clock is 10 minutes later
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: next(clock))
    commits: list[int] = []
    real_commit = checkpoints.commit
    monkeypatch.setattr(checkpoints, "commit", lambda d, e, p: (commits.append(e), real_commit(d, e, p)))
    train(tmp_path / "run", LoopConfig(**{**LOOP.__dict__, "checkpoint_minutes": 5.0}))
    assert commits == [1, 2, 3, 4]
    commits.clear()
    train(tmp_path / "other", LoopConfig(**{**LOOP.__dict__, "checkpoint_minutes": 0.0}))
    assert commits == [4], "without the minutes cadence only checkpoint_every and the last epoch save"


def run_command(runs: Path) -> list[str]:
    """A 2-epoch smoke run: a stop request during epoch 1 leaves epoch 2 to the rerun."""
    return [
        *(sys.executable, "-m", "experiments.run", "tempflow-grpo", "--scale", "smoke"),
        *("--set", "loop.epochs=2", "--runs-dir", str(runs)),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGUSR1", "SIGTERM", "stop file"])
def test_a_preempted_command_exits_75_and_its_rerun_matches_an_uninterrupted_run(
    tmp_path: Path, subprocess_env: dict[str, str], how: str
) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    subprocess.run(run_command(straight), cwd=ROOT, env=subprocess_env, check=True, capture_output=True)
    name = "tempflow-grpo-smoke-seed42"
    run_dir = stopped / name
    process = subprocess.Popen(
        run_command(stopped), cwd=ROOT, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 600
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline, (
            "the run ended before epoch 0 was logged"
        )
        time.sleep(0.05)
    if how == "stop file":
        (run_dir / "stop.request").touch()
    else:
        os.kill(process.pid, getattr(signal, how))
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 75, stderr.decode()[-2000:]
    assert "stopped on request after checkpointing epoch 1" in stderr.decode()
    assert json.loads((run_dir / "status.json").read_text()) | {"ended": None} == {
        "state": "preempted",
        "epoch": 1,
        "ended": None,
    }
    assert not (run_dir / "stop.request").exists()
    subprocess.run(run_command(stopped), cwd=ROOT, env=subprocess_env, check=True, capture_output=True)
    assert RunRecord.is_complete(run_dir)
    assert untimed(read_metrics(run_dir)) == untimed(read_metrics(straight / name))
