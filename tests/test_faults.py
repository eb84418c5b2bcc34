"""Fault injection into real smoke runs: killed (SIGKILL) in a checkpoint write, a reward call or the
evaluation, stopped by a full disk, or by a GenEval reward server that goes down, stalls or answers
garbage mid-run. Each ends in a clear state and loses nothing: the rerun of the same command resumes
from the last checkpoint and finishes with an uninterrupted run's metrics (the machine's timings
aside). tests/fault_injection.py injects the faults in a child process; a
first-order (vgg-flow) and a zeroth-order (tempflow-grpo) method are covered.

The fast tests kill the first-order run in its checkpoint write and fill the disk under the run
record's writes in this process; the slow ones take each fault through a run, for both methods."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fault_injection import RUN, full_disk, launch, metrics_lines, status, temp_files, untimed

from reward_models.geneval_server import URL_ENV
from rsm_core import checkpoints, records
from rsm_core.records import RunRecord, load_tensors, save_tensors_atomic

FIRST_ORDER, ZEROTH_ORDER = "vgg-flow", "tempflow-grpo"
EPOCHS = 2  # launch's default: the faults hit epoch 2, after epoch 1's checkpoint
# the rows logged when a fault stopped epoch 2: its checkpoint is written after its row
LOGGED_BEFORE = {
    "kill-reward": [0, 1],
    "kill-eval": [0, 1],
    "kill-checkpoint": [0, 1, 2],
    "kill-commit": [0, 1, 2],
    "enospc-metrics": [0, 1],
    "enospc-checkpoint": [0, 1, 2],
    "geneval-down": [0, 1],
    "geneval-slow": [0, 1],
    "geneval-garbage": [0, 1],
}
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Callable[..., list[dict]]:
    """A method's uninterrupted run's metrics (untimed), run once per module (and reward)."""
    done: dict[tuple[str, bool], list[dict]] = {}

    def rows(method: str, geneval: bool = False) -> list[dict]:
        if (method, geneval) not in done:
            runs = tmp_path_factory.mktemp(f"uninterrupted-{method}")
            finished = launch("none", runs, method, geneval=geneval)
            assert finished.returncode == 0, finished.stderr[-3000:]
            done[method, geneval] = untimed(metrics_lines(runs / RUN))
        return done[method, geneval]

    return rows


def committed_epoch(run_dir: Path) -> int:
    """The epoch of the run's committed checkpoint, after checking its file matches and loads."""
    path = checkpoints.verified(run_dir, rank=0, processes=1)
    assert path is not None, f"{run_dir} has no committed checkpoint"
    assert load_tensors(path), f"{path} holds no tensors"
    return checkpoints.read_manifest(run_dir)["epoch"]


def check_stopped(fault: str, run_dir: Path, reference: list[dict]) -> None:
    """What a run stopped in epoch 2 must have kept: its earlier rows intact and equal to the
    uninterrupted run's, no partial row, and epoch 1's checkpoint committed and loadable."""
    rows = untimed(metrics_lines(run_dir))
    assert [row["epoch"] for row in rows] == LOGGED_BEFORE[fault]
    assert rows == reference[: len(rows)]
    assert committed_epoch(run_dir) == EPOCHS - 1


def check_killed(
    fault: str, run_dir: Path, result: subprocess.CompletedProcess, reference: list[dict]
) -> None:
    assert result.returncode == -signal.SIGKILL, f"the run was not killed:\n{result.stderr[-3000:]}"
    assert status(run_dir)["state"] == "running"  # nothing ran after the kill to say otherwise
    check_stopped(fault, run_dir, reference)


def check_disk_full(
    fault: str, run_dir: Path, result: subprocess.CompletedProcess, reference: list[dict]
) -> None:
    """A full disk fails the run with a message naming the disk (by the file it held) and the fix."""
    assert result.returncode == 1, result.stderr[-3000:]
    written = run_dir / "metrics.jsonl" if fault == "enospc-metrics" else checkpoints.rank_file(run_dir, 2, 0)
    state = status(run_dir)
    assert state["state"] == "failed"
    error = state["error"]
    assert "no space left" in error.lower() and "disk" in error and str(written) in error, error
    assert "rerun" in error, f"the message does not say how to go on: {error}"
    check_stopped(fault, run_dir, reference)
    assert temp_files(run_dir) == []  # the failed write removed its own temp file


def check_resumed(runs: Path, method: str, reference: list[dict], geneval: bool = False) -> None:
    """Rerun the same command without a fault: it finishes with the uninterrupted run's metrics, its
    last checkpoint and final weights load, and any temp file a killed write left is hidden (no
    reader's glob of results picks it up)."""
    run_dir = runs / RUN
    rerun = launch("none", runs, method, geneval=geneval)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert status(run_dir)["state"] == "complete"
    assert untimed(metrics_lines(run_dir)) == reference
    assert committed_epoch(run_dir) == EPOCHS
    assert load_tensors(run_dir / "weights.safetensors")
    assert all(Path(name).name.startswith(".") for name in temp_files(run_dir)), temp_files(run_dir)


@pytest.mark.parametrize(
    ("fault", "method"),
    [
        # all slow (3 child runs each, 36 s or more): the fast suite kills a checkpoint write in
        # test_rewriting_a_killed_checkpoint_leaves_no_temp_file and tests/test_preemption.py
        pytest.param("kill-checkpoint", FIRST_ORDER, marks=slow),
        pytest.param("kill-reward", FIRST_ORDER, marks=slow),
        pytest.param("kill-eval", FIRST_ORDER, marks=slow),
        pytest.param("kill-reward", ZEROTH_ORDER, marks=slow),
        pytest.param("kill-eval", ZEROTH_ORDER, marks=slow),
        pytest.param("kill-checkpoint", ZEROTH_ORDER, marks=slow),
        pytest.param("kill-commit", ZEROTH_ORDER, marks=slow),
    ],
)
def test_a_killed_run_resumes_to_the_uninterrupted_metrics(fault, method, tmp_path, uninterrupted) -> None:
    reference = uninterrupted(method)
    check_killed(fault, tmp_path / RUN, launch(fault, tmp_path, method), reference)
    check_resumed(tmp_path, method, reference)


@slow
@pytest.mark.parametrize("fault", ["enospc-metrics", "enospc-checkpoint"])
def test_a_full_disk_fails_the_run_naming_the_file_and_the_rerun_resumes(
    fault, tmp_path, uninterrupted
) -> None:
    reference = uninterrupted(FIRST_ORDER)
    check_disk_full(fault, tmp_path / RUN, launch(fault, tmp_path, FIRST_ORDER), reference)
    check_resumed(tmp_path, FIRST_ORDER, reference)


def test_a_full_disk_while_logging_keeps_every_earlier_row_whole(tmp_path) -> None:
    record = RunRecord.create(tmp_path, RUN, {"seed": 0}, wandb=False)
    record.log({"epoch": 0, "reward_mean": 0.5})
    with full_disk(records, "open"), pytest.raises(OSError) as failure:
        record.log({"epoch": 1, "reward_mean": 0.75})
    metrics = record.path / "metrics.jsonl"
    assert failure.value.errno == errno.ENOSPC and str(metrics) in str(failure.value)
    assert "no space left" in str(failure.value).lower()
    assert metrics_lines(record.path) == [{"epoch": 0, "reward_mean": 0.5}]  # the half row is cut off
    record.log({"epoch": 1, "reward_mean": 0.75})  # with space again, the log goes on
    assert [row["epoch"] for row in metrics_lines(record.path)] == [0, 1]


def test_a_full_disk_in_an_atomic_write_keeps_the_previous_file_and_no_temp_file(tmp_path) -> None:
    target = tmp_path / "rank0.safetensors"
    save_tensors_atomic(target, {"weight": torch.zeros(4)})
    with full_disk(os, "fdopen"), pytest.raises(OSError) as failure:
        save_tensors_atomic(target, {"weight": torch.ones(4)})
    assert failure.value.errno == errno.ENOSPC and str(target) in str(failure.value)
    assert torch.equal(load_tensors(target)["weight"], torch.zeros(4))
    assert list(tmp_path.iterdir()) == [target]


def test_rewriting_a_killed_checkpoint_leaves_no_temp_file(tmp_path) -> None:
    """The state a kill in epoch 2's checkpoint write leaves (the temp file of its first file, epoch 1
    committed), then the resumed run's write and commit of epoch 2."""
    tensors = {"w": torch.zeros(2)}
    checkpoints.write_rank(tmp_path, 1, 0, lambda path: save_tensors_atomic(path, tensors))
    checkpoints.commit(tmp_path, 1, 1)
    stale = checkpoints.epoch_folder(tmp_path, 2) / ".rank0.safetensors.k1ll3d.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half a checkpoint")
    checkpoints.write_rank(tmp_path, 2, 0, lambda path: save_tensors_atomic(path, tensors))
    checkpoints.commit(tmp_path, 2, 1)
    assert temp_files(tmp_path) == []


@slow
@pytest.mark.parametrize(
    ("fault", "detail"),
    [
        ("geneval-down", "Connection refused"),
        ("geneval-slow", "timed out"),
        ("geneval-garbage", "malformed JSON response"),
    ],
)
def test_a_geneval_server_failing_mid_run_fails_it_naming_the_server_and_the_rerun_resumes(
    fault, detail, tmp_path, uninterrupted
) -> None:
    reference = uninterrupted(ZEROTH_ORDER, geneval=True)
    failed = launch(fault, tmp_path, ZEROTH_ORDER, geneval=True)
    run_dir = tmp_path / RUN
    assert failed.returncode == 1, failed.stderr[-3000:]
    state = status(run_dir)
    assert state["state"] == "failed"
    assert state["error"].startswith("RewardServerError: GenEval reward server at http://127.0.0.1:")
    assert detail in state["error"] and URL_ENV in state["error"], state["error"]
    check_stopped(fault, run_dir, reference)
    check_resumed(tmp_path, ZEROTH_ORDER, reference, geneval=True)


@slow
def test_a_geneval_server_back_within_the_retries_leaves_the_run_as_it_was(tmp_path, uninterrupted) -> None:
    reference = uninterrupted(ZEROTH_ORDER, geneval=True)
    flaky = launch("geneval-flaky", tmp_path, ZEROTH_ORDER, geneval=True)
    assert flaky.returncode == 0, flaky.stderr[-3000:]
    assert untimed(metrics_lines(tmp_path / RUN)) == reference
