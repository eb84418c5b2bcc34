"""`make all-baselines`: the sweep files list every trainable method and resolve under one matched
budget; jobs run under run locks; a local sweep trains each run once, skips complete runs on a rerun,
reports a failed job and keeps the others; DRY_RUN prints the plan; `make sweep-status` reads it back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, child_env
from omegaconf import OmegaConf

from baselines import registry
from experiments import all_baselines, cluster, run_locks, sweep, sweep_status
from experiments.smoke_reference import UNTIMED
from rsm_core.config import ConfigError, load_config
from rsm_core.records import read_metrics

SCALES = ("smoke", "tiny", "paper")
TRAINABLE = sorted(m.name for m in registry.trainable())


def jobs_of(
    scale: str, overrides: list[str] = (), methods: list[str] | None = None
) -> list[all_baselines.Job]:
    cfg = all_baselines.load(scale, list(overrides))
    chosen = all_baselines.check_methods(cfg, methods)
    return all_baselines.plan(cfg, scale, chosen, Path("/sweep"), environ={})


# ------------------------------------------------------------------------------------------------
# The sweep files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
def test_each_sweep_file_lists_exactly_the_trainable_methods(scale: str) -> None:
    cfg = all_baselines.load(scale)
    assert sorted(cfg.methods) == TRAINABLE


@pytest.mark.parametrize("scale", SCALES)
def test_every_job_resolves_with_the_same_budget_and_its_figure_settings(scale: str) -> None:
    """Every (method, seed) resolves; the budget is the same run.loop setting for every arm; a
    method of a figure runs exactly as its figure's arm (the budget aside)."""
    cfg = all_baselines.load(scale)
    assert len(set(cfg.seeds)) == len(cfg.seeds) and not any(cfg.methods[m].seeds for m in TRAINABLE)
    jobs = jobs_of(scale, ["seeds=[1]"])  # one seed per method: the others differ in the seed only
    assert sorted(job.spec.method for job in jobs) == TRAINABLE
    budget = all_baselines.budget_overrides(cfg.budget)
    for job in jobs:
        entry = cfg.methods[job.spec.method]
        assert job.config.method == job.spec.method and job.spec.run == sweep.run_name(
            job.spec.method, job.spec.seed
        )
        assert job.config.model.backbone == entry.backbone
        for item in budget:
            key, _, value = item.partition("=")
            assert str(OmegaConf.select(job.config, key)) == value, (job.spec.run, key)
        if (
            entry.arm
            and all_baselines.arm_method(all_baselines.FIGURES[entry.figure][0][entry.arm]) == job.spec.method
        ):
            arms, rows = all_baselines.FIGURES[entry.figure]
            figure = load_config(
                sweep.SweepConfig, REPO_ROOT / "experiments" / "configs" / entry.figure / f"{scale}.yaml"
            )
            table = sweep.arm_settings(figure, arms, rows)
            expected = sweep.arm_config(figure, [*table[entry.arm], *budget], job.spec.seed)
            assert OmegaConf.to_yaml(job.config) == OmegaConf.to_yaml(expected), job.spec.run


def test_the_tiny_budget_ends_on_an_ema_update_and_a_budget_between_two_is_noted() -> None:
    """At the tiny budget every EMA arm's last update reaches the weights it evaluates; at 6 epochs
    (the EMA of the zeroth-order flow arms moves at epochs 4 and 8) the sweep names exactly those."""
    cfg = all_baselines.load("tiny")
    assert all_baselines.stale_ema_notes(jobs_of("tiny"), cfg.budget) == []
    six = all_baselines.load("tiny", ["budget.value=6"])
    jobs = jobs_of("tiny", ["budget.value=6"])
    noted = {note.split(":")[0] for note in all_baselines.stale_ema_notes(jobs, six.budget)}
    with_ema = {job.spec.run for job in jobs if job.config.loop.ema}
    assert noted == with_ema and "tempflow-grpo-seed0" in noted and "vgg-flow-seed0" not in noted


def test_every_group_of_the_tiny_sweep_names_its_image_file_plainly() -> None:
    """The side-by-side image of a group is <sweep>_<group>_images.png with no spaces, brackets or
    repeated separators, and no two groups share a file."""
    groups = {job.spec.group for job in jobs_of("tiny", ["seeds=[0]"])}
    stems = {all_baselines.file_stem(group) for group in groups}
    assert len(stems) == len(groups)
    assert "first-order-diffusion-fig5-settings" in stems and "fig_zo_flow" in stems
    for stem in stems:
        assert stem and all(c.isalnum() or c in "-_" for c in stem) and "--" not in stem, stem


def test_every_method_of_a_figure_takes_its_settings_from_a_figure_arm_of_its_own() -> None:
    in_figures = {
        all_baselines.arm_method(items)
        for arms, _ in all_baselines.FIGURES.values()
        for items in arms.values()
    }
    for scale in SCALES:
        cfg = all_baselines.load(scale)
        for name in in_figures:
            entry = cfg.methods[name]
            assert entry.arm, (scale, name)
            assert all_baselines.arm_method(all_baselines.FIGURES[entry.figure][0][entry.arm]) == name


def test_the_budget_becomes_the_same_loop_settings_for_every_arm() -> None:
    epochs = OmegaConf.create({"kind": "epochs", "value": 3})
    assert all_baselines.budget_overrides(epochs) == ["loop.epochs=3"]
    hours = OmegaConf.create({"kind": "gpu_hours", "value": 48.0})
    assert all_baselines.budget_overrides(hours) == ["loop.budget_kind=gpu_hours", "loop.budget_limit=48.0"]
    with pytest.raises(ConfigError, match="whole number of epochs"):
        all_baselines.load("smoke", ["budget.value=1.5"])


def test_an_entry_that_would_change_the_matched_budget_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"methods.vgg-flow.overrides: loop.epochs=5 would change the budget"
    ):
        jobs_of("smoke", ["methods.vgg-flow.overrides=[loop.epochs=5]"], ["vgg-flow"])


def test_a_sweep_file_without_a_method_or_with_an_unknown_one_is_refused() -> None:
    cfg = OmegaConf.to_container(all_baselines.load("smoke"))
    del cfg["methods"]["sqdf"]
    cfg["methods"]["not-a-method"] = {}
    with pytest.raises(ConfigError, match=r"missing \['sqdf'\], not trainable or unknown \['not-a-method'\]"):
        all_baselines.check_methods(OmegaConf.create(cfg), None)
    with pytest.raises(ConfigError, match="--methods nope"):
        all_baselines.check_methods(all_baselines.load("smoke"), ["nope"])


def test_a_bad_figure_or_arm_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"methods.vgg-flow.arm='Nope' is no arm of fig5; its arms are"):
        jobs_of("smoke", ["methods.vgg-flow.arm=Nope"], ["vgg-flow"])
    with pytest.raises(ConfigError, match=r"methods.sqdf.figure='fig9': choose one of"):
        jobs_of("smoke", ["methods.sqdf.figure=fig9"], ["sqdf"])


# ------------------------------------------------------------------------------------------------
# Cluster settings and wandb from the environment
# ------------------------------------------------------------------------------------------------


def test_the_environment_wins_over_the_sweep_file_for_every_cluster_setting() -> None:
    config = cluster.ClusterConfig(partition="from-file", timeout_min=60)
    changed = cluster.with_environment(
        config, {"RSM_SLURM_PARTITION": "a100", "RSM_SLURM_TIMEOUT_MIN": "90", "RSM_SLURM_ACCOUNT": "lab"}
    )
    assert (changed.partition, changed.timeout_min, changed.account) == ("a100", 90, "lab")
    assert cluster.with_environment(config, {}) == config
    with pytest.raises(ConfigError, match=r"RSM_SLURM_TIMEOUT_MIN='two hours' is not a int"):
        cluster.with_environment(config, {"RSM_SLURM_TIMEOUT_MIN": "two hours"})
    with pytest.raises(ConfigError, match="signal_delay_min"):
        cluster.with_environment(config, {"RSM_SLURM_SIGNAL_DELAY_MIN": "60"})


def test_every_environment_variable_is_documented() -> None:
    doc = (REPO_ROOT / "docs" / "cluster.md").read_text()
    assert all(name in doc for name in cluster.environment_names())


def test_the_job_wrapper_speaks_experiments_run_s_stop_protocol() -> None:
    from experiments import run

    assert (cluster.PREEMPTED_EXIT, cluster.STOP_FILE) == (run.PREEMPTED_EXIT, run.STOP_FILE)


def test_the_jobs_get_wandb_entity_and_project_from_the_environment_else_the_file() -> None:
    cfg = all_baselines.load("smoke", ["wandb.entity=lab", "wandb.project=from-file"])
    assert all_baselines.job_environment(cfg, {}) == {"WANDB_ENTITY": "lab", "WANDB_PROJECT": "from-file"}
    assert all_baselines.job_environment(cfg, {"WANDB_PROJECT": "mine"})["WANDB_PROJECT"] == "mine"
    assert all_baselines.job_environment(all_baselines.load("smoke"), {}) == {}


# ------------------------------------------------------------------------------------------------
# Locks
# ------------------------------------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def plant(path: Path, job_id: str, pid: int, host: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = {"job_id": job_id, "host": host or socket.gethostname(), "pid": pid, "started": "then"}
    path.write_text(json.dumps(holder))


def test_a_lock_is_exclusive_names_its_job_and_only_its_job_releases_it(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "run.lock"
    held = run_locks.acquire(lock, "local-1")
    assert held.pid == os.getpid() and json.loads(lock.read_text())["job_id"] == "local-1"
    plant(lock, f"local-{os.getpid()}", os.getpid())  # a live local job of this host
    with pytest.raises(run_locks.LockBusy, match=rf"running under job local-{os.getpid()}"):
        run_locks.acquire(lock, "local-2")
    run_locks.release(lock, "local-2")
    assert lock.exists()
    run_locks.release(lock, f"local-{os.getpid()}")
    assert not lock.exists()


def test_a_stale_lock_is_taken_over_with_a_message_and_a_live_one_never(tmp_path: Path) -> None:
    lock, said = tmp_path / "run.lock", []
    plant(lock, "local-9", dead_pid())
    run_locks.acquire(lock, "local-new", say=said.append)
    assert "taking over the lock of job local-9" in said[0] and "is gone" in said[0]
    plant(lock, "local-9", dead_pid(), host="another-node")  # another host's process cannot be checked
    with pytest.raises(run_locks.LockBusy):
        run_locks.acquire(lock, "local-new")
    plant(lock, "4242_3", 1)
    for listed, taken in ((False, True), (True, False), (None, False)):  # squeue: gone, lists it, cannot tell
        plant(lock, "4242_3", 1)
        if taken:
            run_locks.acquire(lock, "local-new", say=said.append, listed=lambda job, v=listed: v)
            assert "Slurm job 4242_3 is no longer in the queue" in said[-1]
        else:
            with pytest.raises(run_locks.LockBusy, match="running under job 4242_3"):
                run_locks.acquire(lock, "local-new", listed=lambda job, v=listed: v)
    plant(lock, "4242_3", 1)  # a requeued job keeps its id: the lock is its own
    assert run_locks.acquire(lock, "4242_3", say=said.append, listed=lambda job: True).job_id == "4242_3"


def test_the_job_id_is_the_array_task_the_slurm_job_or_the_local_process(monkeypatch) -> None:
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(name, raising=False)
    assert run_locks.current_job_id() == f"local-{os.getpid()}"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert run_locks.current_job_id() == f"local-{os.getpid()}"  # a local sweep inside an allocation
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # a job the sweep submitted
    assert run_locks.current_job_id() == "77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_locks.current_job_id() == "70_3"


# ------------------------------------------------------------------------------------------------
# DRY_RUN
# ------------------------------------------------------------------------------------------------


def test_a_local_dry_run_prints_every_job_and_command_and_starts_nothing(tmp_path: Path, capsys) -> None:
    methods = "sqdf,tempflow-grpo,vgg-flow-linear-a,fair-clip"
    all_baselines.main(["--scale", "smoke", "--dry-run", "--runs-dir", str(tmp_path), "--methods", methods])
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "all_baselines-smoke"
    assert "all_baselines-smoke on local: 4 methods, 4 jobs, budget 1 epochs per run" in out
    for group in ("fig3", "fig6", "first-order diffusion (fig5 settings)", "zeroth-order flow"):
        assert f"\n{group}\n" in out
    command = (
        f"-m experiments.run --config {sweep_dir}/jobs/sqdf-seed0.yaml --name sqdf-seed0 "
        f"--runs-dir {sweep_dir} --group all_baselines-smoke --job-type sqdf --scale smoke --seed-label 0"
    )
    assert command in out and "#SBATCH" not in out
    assert not sweep_dir.exists()


def test_a_slurm_dry_run_prints_gpu_hours_per_figure_and_each_array_script(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RSM_SLURM_PARTITION", "h200")
    monkeypatch.setenv("RSM_SLURM_ACCOUNT", "rsm")
    argv = ["--scale", "paper", "--cluster", "slurm", "--dry-run", "--runs-dir", str(tmp_path)]
    all_baselines.main([*argv, "--methods", "tempflow-grpo,vgg-flow,sqdf"])
    out = capsys.readouterr().out
    # 48 GPU-hours of training x (1 + 0.15) = 55.2 per run, 3 seeds per method
    assert "budget 48 GPU-hours of training per run" in out and "48 x (1 + 0.15)" in out
    for group in ("fig3", "fig5", "first-order diffusion (fig5 settings)"):
        assert f"\n{group}\n" in out and f"  {group} total: 165.6 GPU-hours" in out
    assert "total: 9 jobs, 30 GPUs, 496.8 GPU-hours\nGPU-hours estimate: budget x (1 + eval_share)" in out
    assert "-m experiments.launch --processes 4 experiments.run --config" in out
    assert "-m experiments.launch --processes 2 experiments.run --config" in out
    for array, jobs, gpus in (("all_baselines-paper-4gpu", 6, 4), ("all_baselines-paper-2gpu", 3, 2)):
        script = out.split(f"sbatch script of {array} (an array of {jobs} jobs):")[1].split("sbatch script")[
            0
        ]
        for line in (f"--array=0-{jobs - 1}%{jobs}", f"--gpus-per-node={gpus}", f"--job-name={array}"):
            assert f"#SBATCH {line}" in script
        for line in ("--partition=h200", "--account=rsm", "--signal=USR1@600", "--time=1440"):
            assert f"#SBATCH {line}" in script
        assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in script and "-m submitit.core._submit" in script
    assert not (tmp_path / "all_baselines-paper").exists()


@pytest.mark.slow
def test_a_dry_run_with_the_plan_prints_each_jobs_memory_per_gpu(tmp_path, capsys) -> None:
    """`make plan`'s per-GPU peak beside every paper job (a minute or more without plan's cache)."""
    argv = ["--scale", "paper", "--cluster", "slurm", "--dry-run", "--plan", "--runs-dir", str(tmp_path)]
    all_baselines.main([*argv, "--methods", "pcpo-reweight,residual-nabla-db", "--set", "seeds=[0]"])
    out = capsys.readouterr().out
    assert "memory per GPU (make plan)" in out
    for run in ("pcpo-reweight-seed0", "residual-nabla-db-seed0"):
        (line,) = [line for line in out.splitlines() if line.strip().startswith(run)]
        peak, budget = line.split()[-3].split("/")
        assert 0 < float(peak) <= float(budget) == 24 and line.endswith("GiB fits")


def test_an_epoch_budget_prints_the_time_limit_as_an_upper_bound(tmp_path, capsys) -> None:
    argv = ["--scale", "paper", "--cluster", "slurm", "--dry-run", "--runs-dir", str(tmp_path)]
    all_baselines.main(
        [*argv, "--set", "budget.kind=epochs", "--set", "budget.value=10", "--methods", "vgg-flow"]
    )
    out = capsys.readouterr().out
    assert "GPU-hours estimate: an upper bound per job attempt: the Slurm time limit x GPUs" in out
    assert "fig5 total: 288.0 GPU-hours" in out  # 3 seeds x 24 h x 4 GPUs


def test_a_job_needing_more_gpus_than_a_node_has_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("RSM_SLURM_GPUS_PER_NODE", "2")
    argv = ["--scale", "paper", "--cluster", "slurm", "--runs-dir", str(tmp_path)]
    with pytest.raises(
        ConfigError, match=r"^vgg-flow, .* need more GPUs than a node has .*RSM_SLURM_GPUS_PER_NODE"
    ):
        all_baselines.main(argv)
    assert not (tmp_path / "all_baselines-paper").exists()


# ------------------------------------------------------------------------------------------------
# sweep-status
# ------------------------------------------------------------------------------------------------


def test_sweep_status_reads_states_epochs_rewards_and_gpu_hours_from_the_runs(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "jobs").mkdir(parents=True)
    for run in ("done", "busy", "killed", "queued", "broken", "later"):
        (sweep_dir / "jobs" / f"{run}.yaml").write_text("{}")
    runs = {"done": "complete", "busy": "running", "killed": "running", "broken": "failed"}
    for run, state in runs.items():
        (sweep_dir / run).mkdir()
        (sweep_dir / run / "status.json").write_text(json.dumps({"state": state}))
    rows = [{"epoch": 0, "eval_reward": 1.0}, {"epoch": 2, "eval_reward": 1.5, "gpu_hours": 0.25}]
    (sweep_dir / "done" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plant(sweep_dir / "locks" / "busy.lock", "5_1", 1)
    plant(sweep_dir / "locks" / "killed.lock", "local-9", dead_pid())
    (sweep_dir / "jobs" / "queued.submitted.json").write_text(json.dumps({"job_id": "5_2"}))
    asked = []

    def states(ids: list[str]) -> dict[str, str]:
        asked.append(sorted(ids))
        return {"5_1": "RUNNING", "5_2": "PENDING"}

    table = {row.run: row for row in sweep_status.rows(sweep_dir, states)}
    assert asked == [["5_1", "5_2"]]
    assert {run: row.state for run, row in table.items()} == {
        "done": "complete",
        "busy": "running",
        "killed": "interrupted",
        "queued": "queued",
        "broken": "failed",
        "later": "not started",
    }
    assert (table["done"].epochs, table["done"].eval_reward, table["done"].gpu_hours) == (2, 1.5, 0.25)
    assert (table["busy"].job_id, table["busy"].slurm) == ("5_1", "RUNNING")
    text = sweep_status.render(list(table.values()))
    assert (
        "6 runs: 1 complete, 1 failed, 1 interrupted, 1 not started, 1 queued, 1 running; 0.25 GPU-hours"
        in text
    )


# ------------------------------------------------------------------------------------------------
# Local sweeps
# ------------------------------------------------------------------------------------------------

# the two cheapest smoke runs (about 10 s each on 2 cores, measured with `python -m experiments.run
# METHOD --scale smoke`: the other methods take 12 to 33 s)
CHEAP = "vgg-flow-linear-a,reward-score-distillation-flow"


def sweep_command(runs_dir: Path, *args: str) -> list[str]:
    table = runs_dir / "all_baselines.md"
    return [
        sys.executable,
        "-m",
        "experiments.all_baselines",
        "--scale",
        "smoke",
        "--runs-dir",
        str(runs_dir),
    ] + [
        "--table",
        str(table),
        "--figures-dir",
        str(runs_dir / "figures"),
        *args,
    ]


def log_starts(sweep_dir: Path, run: str) -> int:
    return (sweep_dir / "logs" / f"{run}.log").read_text().count(" starts: ")


@pytest.fixture(scope="module")
def two_sweeps_at_once(tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
    """Two smoke sweeps of the two cheapest methods started at once on one directory."""
    runs_dir = tmp_path_factory.mktemp("sweeps")
    started = [
        subprocess.Popen(
            sweep_command(runs_dir, "--methods", CHEAP),
            cwd=REPO_ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    finished = []
    for process in started:
        out, err = process.communicate(timeout=600)
        finished.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return runs_dir / "all_baselines-smoke", finished


def test_two_sweeps_at_once_train_each_run_once_and_a_rerun_skips_them(two_sweeps_at_once) -> None:
    sweep_dir, sweeps = two_sweeps_at_once
    for sweep_run in sweeps:
        assert sweep_run.returncode == 0, sweep_run.stdout + sweep_run.stderr
        assert (
            "all_baselines-smoke done in" in sweep_run.stdout and f"runs in {sweep_dir}" in sweep_run.stdout
        )
    for method in CHEAP.split(","):
        run = f"{method}-seed0"
        assert json.loads((sweep_dir / run / "status.json").read_text())["state"] == "complete"
        assert [row["epoch"] for row in read_metrics(sweep_dir / run)] == [0, 1]  # the budget: 1 epoch
        assert log_starts(sweep_dir, run) == 1
        trained = [s for s in sweeps if f"{run}: complete" in s.stdout]
        skipped = [
            s
            for s in sweeps
            if f"{run}: already complete" in s.stdout or f"{run}: running elsewhere" in s.stdout
        ]
        assert len(trained) == 1 and len(skipped) == 1
        assert (sweep_dir / "jobs" / f"{run}.yaml").exists()
    assert not list((sweep_dir / "locks").glob("*.lock"))
    # one side-by-side image per figure: both methods are Figures 5/6's flow arms of different figures
    grids = sorted(path.name for path in (sweep_dir.parent / "figures" / "smoke").glob("*_images.png"))
    assert grids == ["all_baselines-smoke_fig5_images.png", "all_baselines-smoke_fig6_images.png"]
    rerun = subprocess.run(
        sweep_command(sweep_dir.parent, "--methods", CHEAP),
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0 and rerun.stdout.count(": already complete") == 2, (
        rerun.stdout + rerun.stderr
    )


def test_a_run_another_live_job_holds_is_skipped_and_named(tmp_path: Path, capsys) -> None:
    sweep_dir = tmp_path / "all_baselines-smoke"
    plant(sweep_dir / "locks" / "vgg-flow-linear-a-seed0.lock", f"local-{os.getpid()}", os.getpid())
    all_baselines.main(["--scale", "smoke", "--runs-dir", str(tmp_path), "--methods", "vgg-flow-linear-a"])
    out = capsys.readouterr().out
    assert f"vgg-flow-linear-a-seed0: running elsewhere (running under job local-{os.getpid()}" in out
    assert not (sweep_dir / "vgg-flow-linear-a-seed0").exists()


@pytest.mark.slow  # make test stays under 10 minutes (measured 11:08 with it)
def test_a_failed_job_is_reported_the_others_go_on_and_the_sweep_exits_non_zero(two_sweeps_at_once) -> None:
    sweep_dir, _ = two_sweeps_at_once
    fails = (
        "methods.vgg-flow.overrides=['model.lora_targets=[no_such_module]']"  # fails once the run has begun
    )
    result = subprocess.run(
        sweep_command(sweep_dir.parent, "--methods", f"vgg-flow,{CHEAP}", "--set", fails),
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "error: 1 job(s) failed: vgg-flow-seed0" in result.stderr
    log = sweep_dir / "logs" / "vgg-flow-seed0.log"
    error = json.loads((sweep_dir / "vgg-flow-seed0" / "status.json").read_text())["error"]
    assert "no_such_module" in error
    assert f"FAILED vgg-flow-seed0: exit 1; {error}; log {log}" in result.stdout
    assert result.stdout.count(": already complete") == 2  # the jobs after it went on
    assert "1 failed, 2 already complete" in result.stdout


@pytest.mark.slow
def test_a_smoke_sweep_trains_every_trainable_method(tmp_path: Path) -> None:
    result = subprocess.run(
        sweep_command(tmp_path), cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in TRAINABLE:
        run_dir = tmp_path / "all_baselines-smoke" / f"{name}-seed0"
        assert [row["epoch"] for row in read_metrics(run_dir)] == [0, 1], name
    assert "20 complete" in result.stdout


@pytest.mark.slow
def test_an_interrupted_two_process_sweep_resumes_to_the_metrics_of_an_uninterrupted_one(
    tmp_path: Path,
) -> None:
    """SIGTERM to a local sweep reaches a 2-process run through experiments.launch and accelerate
    (which ignore it): the workers finish their epoch, checkpoint and exit; the sweep exits 75, and
    the rerun resumes the run to the metrics of an uninterrupted run, the timings aside."""
    method = "vgg-flow-linear-a"
    args = [
        "--methods",
        method,
        "--set",
        "budget.value=4",
        "--set",
        f"methods.{method}.gpus=2",
        "--allow-cpu",
    ]
    run = f"{method}-seed0"
    sweep_dir = tmp_path / "stopped" / "all_baselines-smoke"
    stopped = subprocess.Popen(
        sweep_command(tmp_path / "stopped", *args),
        cwd=REPO_ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while 1 not in [row["epoch"] for row in sweep_status.metrics(sweep_dir / run)]:
        assert time.monotonic() < deadline and stopped.poll() is None, (
            "the run never finished its first epoch"
        )
        time.sleep(0.2)
    stopped.send_signal(signal.SIGTERM)
    out, _ = stopped.communicate(timeout=300)
    assert stopped.returncode == cluster.PREEMPTED_EXIT, out
    assert f"stopped early: {run}; rerun the same command to resume" in out
    assert json.loads((sweep_dir / run / "status.json").read_text())["state"] == "preempted"
    resumed = subprocess.run(sweep_command(tmp_path / "stopped", *args), cwd=REPO_ROOT, env=child_env())
    reference = subprocess.run(sweep_command(tmp_path / "reference", *args), cwd=REPO_ROOT, env=child_env())
    assert resumed.returncode == 0 and reference.returncode == 0

    def untimed(path: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if not k.startswith(UNTIMED)} for row in read_metrics(path)]

    again = untimed(sweep_dir / run)
    assert [row["epoch"] for row in again] == [0, 1, 2, 3, 4]
    assert again == untimed(tmp_path / "reference" / "all_baselines-smoke" / run)
