"""The Slurm path of `make all-baselines`, on fake sbatch/squeue/sacct/scancel/scontrol/srun
(tests/fake_slurm) that record their calls and run the jobs here: the generated script, the job
array, the requeue after SIGUSR1 and the resume, and a failure's report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, child_env

from experiments import cluster, sweep_status
from experiments.smoke_reference import UNTIMED
from rsm_core.records import read_metrics

FAKE = REPO_ROOT / "tests" / "fake_slurm"
STAND_IN = FAKE / "stand_in_run.py"


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """Fake Slurm commands first on PATH, their state in a temporary directory; at the end every job
    the test left running is cancelled."""
    state = tmp_path / "slurm-state"
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    monkeypatch.setenv("PATH", f"{FAKE}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # the jobs import this checkout
    for name in [key for key in os.environ if key.startswith(("SLURM_", "RSM_SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(name)
    yield state
    subprocess.run(["scancel", *[path.stem for path in (state / "jobs").glob("*.json")]], check=False)


def calls(state: Path, command: str) -> list[dict]:
    lines = (state / "calls.jsonl").read_text().splitlines()
    return [call for call in map(json.loads, lines) if call["command"] == command]


def spec(sweep: Path, run: str, mode: str) -> cluster.JobSpec:
    return cluster.JobSpec(
        run=run,
        method="stand-in",
        seed=0,
        group="tests",
        gpus=0,
        processes=1,
        sweep_dir=sweep,
        command=(sys.executable, str(STAND_IN), str(sweep / run), mode),
        cwd=REPO_ROOT,
    )


def wait_for(condition, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.1)


def starts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()]


def test_an_array_requeues_a_run_after_sigusr1_and_the_requeued_job_resumes_it(fake_slurm, tmp_path):
    sweep = tmp_path / "sweep"
    settings = cluster.ClusterConfig(partition="gpu", timeout_min=30, signal_delay_min=2, array_parallelism=4)
    params = cluster.slurm_parameters(settings, gpus=0, name="sweep-cpu")
    jobs = [spec(sweep, "waits", "wait"), spec(sweep, "completes", "ok"), spec(sweep, "fails", "fail")]
    handles = cluster.submit(sweep / "slurm" / "%j", params, [cluster.RunJob(s, 20) for s in jobs], 3)

    assert len(calls(fake_slurm, "sbatch")) == 1  # one array
    script = (fake_slurm / "scripts" / "1000.sh").read_text()
    for line in (
        "--array=0-2%3",
        "--signal=USR1@120",
        "--partition=gpu",
        "--time=30",
        "--job-name=sweep-cpu",
    ):
        assert f"#SBATCH {line}" in script
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in script and "srun --unbuffered" in script
    assert [h.job_id for h in handles] == ["1000_0", "1000_1", "1000_2"]

    wait_for(lambda: (sweep / "waits" / "waiting").exists(), what="the first task to start its run")
    subprocess.run(["scancel", "--signal", "USR1", "1000_0"], check=True)  # as Slurm before the limit
    for handle in handles:
        wait_for(handle.done, what=f"job {handle.job_id}")

    results = {s.run: cluster.collect(s, h) for s, h in zip(jobs, handles, strict=True)}
    assert results["waits"].outcome == "complete" and results["completes"].outcome == "complete"
    assert results["fails"].outcome == "failed"
    assert "exit 3; ValueError: a planted failure; log" in results["fails"].detail
    assert str(sweep / "logs" / "fails.log") in results["fails"].detail
    # submitit requeued the task; the requeued task (same job id, next restart) kept the lock and resumed
    assert [call["args"] for call in calls(fake_slurm, "scontrol")] == [["requeue", "1000_0"]]
    assert starts(sweep / "waits") == [{"restart": "0", "lock": "1000_0"}, {"restart": "1", "lock": "1000_0"}]
    assert json.loads((sweep / "waits" / "status.json").read_text())["state"] == "complete"
    assert not list((sweep / "locks").glob("*.lock"))  # every job released its lock at its end
    log = (sweep / "logs" / "waits.log").read_text()
    assert log.count("job 1000_0 starts") == 2 and "taking over" not in log


def test_a_job_finding_its_run_locked_by_a_queued_slurm_job_skips_it(fake_slurm, tmp_path):
    sweep = tmp_path / "sweep"
    params = cluster.slurm_parameters(cluster.ClusterConfig(timeout_min=30, signal_delay_min=2), 0, "a")
    (first,) = cluster.submit(
        sweep / "slurm" / "%j", params, [cluster.RunJob(spec(sweep, "r", "wait"), 20)], 3
    )
    wait_for(lambda: (sweep / "r" / "waiting").exists(), what="the first job's run")
    (second,) = cluster.submit(
        sweep / "slurm" / "%j", params, [cluster.RunJob(spec(sweep, "r", "ok"), 20)], 3
    )
    wait_for(second.done, what="the second job")
    result = cluster.collect(spec(sweep, "r", "ok"), second)
    assert result.outcome == "running elsewhere" and f"running under job {first.job_id}" in result.detail
    subprocess.run(["scancel", "--signal", "USR1", first.job_id], check=True)
    wait_for(first.done, what="the first job")
    assert len(starts(sweep / "r")) == 2  # the first job's start and its resume, never the second job's


@pytest.mark.slow
def test_a_sweep_run_preempted_on_slurm_resumes_to_the_metrics_of_an_uninterrupted_run(fake_slurm, tmp_path):
    """`make all-baselines CLUSTER=slurm` on the fake Slurm: SIGUSR1 mid-run (as Slurm sends before
    the time limit) stops the run at its epoch's end, submitit requeues the job, the requeued job
    resumes the run, and its metrics equal a local uninterrupted run's but for the timings."""
    method = "vgg-flow-linear-a"
    common = [sys.executable, "-m", "experiments.all_baselines", "--scale", "smoke", "--methods", method]
    common += ["--set", "budget.value=4", "--table", str(tmp_path / "table.md")]
    local = subprocess.run(
        [*common, "--runs-dir", str(tmp_path / "local")], cwd=REPO_ROOT, env=child_env(), capture_output=True
    )
    assert local.returncode == 0, local.stdout + local.stderr
    sweep = subprocess.Popen(
        [*common, "--runs-dir", str(tmp_path / "slurm"), "--cluster", "slurm", "--poll-seconds", "1"],
        cwd=REPO_ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sweep_dir, run = tmp_path / "slurm" / "all_baselines-smoke", f"{method}-seed0"
    logged = lambda: [row["epoch"] for row in sweep_status.metrics(sweep_dir / run)]  # noqa: E731
    wait_for(lambda: 1 in logged(), timeout=300, what="the run's first epoch")
    job_id = json.loads((sweep_dir / "jobs" / f"{run}.submitted.json").read_text())["job_id"]
    subprocess.run(["scancel", "--signal", "USR1", job_id], check=True)
    out, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, out
    assert f"{run}: complete" in out
    assert [call["args"] for call in calls(fake_slurm, "scontrol")] == [["requeue", job_id]]
    assert (sweep_dir / "logs" / f"{run}.log").read_text().count(f"job {job_id} starts") == 2

    def untimed(path: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if not k.startswith(UNTIMED)} for row in read_metrics(path)]

    resumed, uninterrupted = (
        untimed(sweep_dir / run),
        untimed(tmp_path / "local" / "all_baselines-smoke" / run),
    )
    assert [row["epoch"] for row in resumed] == [0, 1, 2, 3, 4]
    assert resumed == uninterrupted
