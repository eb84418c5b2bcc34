"""Exact resume: a run killed with SIGKILL mid-epoch and rerun with the same command finishes with the
same metrics as an uninterrupted run (wall-clock columns aside: they measure this machine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.smoke_reference import UNTIMED
from rsm_core import checkpoints

ROOT = Path(__file__).resolve().parents[1]
RUN = "tempflow-grpo-seed0"


def command(runs: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.fig3",
        "--scale",
        "smoke",
        "--runs-dir",
        str(runs),
        "--figures-dir",
        str(runs / "figures"),
        "--set",
        "arms=[TempFlow-GRPO]",
        "--set",
        "run.loop.epochs=3",
        "--set",
        "run.loop.eval_every=2",
    ]


def metrics(runs: Path) -> list[dict]:
    path = runs / "fig3-smoke" / RUN / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        {k: v for k, v in row.items() if not k.startswith(UNTIMED)}
        for row in rows  # machine measurements out
    ]


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the run did not reach the kill point in time")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_gives_identical_metrics(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(straight), cwd=ROOT, env=subprocess_env, check=True, capture_output=True)

    run_dir = killed / "fig3-smoke" / RUN
    process = subprocess.Popen(
        command(killed), cwd=ROOT, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        # after the epoch-1 checkpoint the run is inside epoch 2: kill it there
        wait_for(lambda: checkpoints.latest(run_dir) is not None and len(metrics(killed)) >= 2, 300)
        time.sleep(0.5)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"
    assert len(metrics(killed)) < len(metrics(straight)), "killed too late: the run had finished"

    subprocess.run(command(killed), cwd=ROOT, env=subprocess_env, check=True, capture_output=True)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "complete"
    assert metrics(killed) == metrics(straight)
    assert [row["epoch"] for row in metrics(killed)] == [0, 1, 2, 3]
