"""`make all-baselines`: every registered trainable method under one matched compute budget.

    python -m experiments.all_baselines --scale smoke|tiny|paper --cluster local|slurm [--dry-run]
        [--set key=value ...] [--methods a,b]

The sweep is data: ``configs/all_baselines/<scale>.yaml`` lists every trainable method of
baselines/registry.py with where its run settings come from, its backbone, reward, seeds and GPUs,
and one budget for all of them. A method runs with its figure's settings (``figure`` + ``arm``: the
figure's scale file, its arm table, its row's ``family_overrides`` and its ``arm_overrides``, as
``make <figure>`` runs it); a method in no figure takes a figure's run settings for its model family
(``figure`` + ``family``: the scale file and that row's ``family_overrides``) or, without
``figure``, configs/run/<arm kind>/<scale>.yaml. Then come the entry's backbone and reward, its
``overrides``, and last the budget, applied alike to every arm as run.loop settings:

- ``budget.kind: epochs``: loop.epochs = value;
- ``nfe`` / ``gpu_hours``: loop.budget_kind and loop.budget_limit = value; a run stops at the first
  epoch that reaches it, and its config's loop.epochs stays a cap.

Jobs are (method, seed) pairs; run names are experiments.sweep.run_name(method, seed) and the runs live
in results/runs/all_baselines-<scale> (--runs-dir, --name). Before anything starts, every job's run
config is resolved and checked (a bad key fails here, not an hour in), a run directory that holds
another config is refused, and each config is written to ``<sweep>/jobs/<run>.yaml``. A job runs

    python -m experiments.run --config <sweep>/jobs/<run>.yaml --name <run> --runs-dir <sweep>
        --group <sweep name> --job-type <method> --scale <scale> --seed-label <seed>

(through experiments.launch with one process per GPU when the entry asks for more than one GPU),
under a lock (experiments.run_locks), output in ``<sweep>/logs/<run>.log``. ``--cluster local`` runs
the jobs one after another here; ``slurm`` submits one job array per GPU count through submitit
(experiments.cluster: partition, account and the rest from the sweep file's ``cluster:`` section or
RSM_SLURM_* variables) and waits for them (--no-wait returns after submitting; `make sweep-status`
shows them). Rerunning the command skips complete runs, resumes unfinished ones and skips runs that
another live job holds ("running under job <id>"). A failed job is reported (name, exit code, the
error status.json recorded, its log) and the others go on; the command then exits non-zero naming
the failed jobs. wandb: WANDB_ENTITY / WANDB_PROJECT from the environment, else the sweep file's
``wandb:`` section, reach every job; the mode stays WANDB_MODE's (offline by default).

``--dry-run`` (DRY_RUN=1) submits nothing: it prints the jobs by figure or family with their GPUs and
GPU-hours, each figure's and the total, every job's command and, for Slurm, the sbatch script of
each array. GPU-hours: with ``budget.kind: gpu_hours`` a run's GPU time is the budget, which counts
training (processes x training wall-clock), plus its evaluation, estimated as ``budget.eval_share``
of it: value x (1 + eval_share). With epochs or NFE the run's time is not known in advance, so the
Slurm time limit x the job's GPUs is printed, labelled as an upper bound per job attempt.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from omegaconf import DictConfig, OmegaConf

from baselines import registry
from baselines.method import Method
from experiments import (
    cluster,
    fig3,
    fig5,
    fig6,
    fig_zo_diffusion,
    fig_zo_flow,
    image_grids,
    run_locks,
    sweep,
)
from experiments.cli import run as run_cli
from experiments.run import PAPER_BACKBONES, RunConfig, run_inputs, scale_files, trainable_method
from experiments.summary import write_summary
from rsm_core.config import ConfigError, load_config, require
from rsm_core.records import RunExistsError, RunRecord, atomic_write_text

CONFIGS = Path(__file__).parent / "configs" / "all_baselines"
REPO = Path(__file__).resolve().parents[1]
TABLE = Path("results/tables/all_baselines.md")

# The figures whose arms a method can take its settings from: their arm tables and model-family rows
FIGURES: dict[str, tuple[dict[str, list[str]], list[sweep.PanelRow] | None]] = {
    "fig3": (fig3.ARMS, None),
    "fig_zo_flow": (fig_zo_flow.ARMS, None),
    "fig_zo_diffusion": (fig_zo_diffusion.ARMS, None),
    "fig5": (fig5.ARMS, fig5.ROWS),
    "fig6": (fig6.ARMS, fig6.ROWS),
}


@dataclass
class BudgetConfig:
    """One compute budget for every arm."""

    kind: Literal["epochs", "nfe", "gpu_hours"] = "epochs"
    value: float = 1.0
    # gpu_hours: a run's evaluation GPU time as a share of its budgeted training time (an estimate, for
    # the DRY_RUN total only: the budget counts training, evaluation comes on top)
    eval_share: float = 0.0

    def __post_init__(self) -> None:
        require(self.value > 0, "budget.value", "must be positive")
        require(
            self.kind != "epochs" or float(self.value).is_integer(),
            "budget.value",
            f"kind epochs needs a whole number of epochs, got {self.value}",
        )
        require(self.eval_share >= 0, "budget.eval_share", "must not be negative")


@dataclass
class MethodEntry:
    """Where one method's run settings come from, and its own."""

    # "": configs/run/<arm kind>/<scale>.yaml; else a figure of FIGURES, with its arm or its family
    figure: str = ""
    arm: str = ""  # the figure's arm whose settings the method takes (its figure's own arm)
    family: str = ""  # a method in no figure: the figure's run settings for this model family (a row)
    backbone: str = "tiny"  # model.backbone
    reward: str = ""  # "" keeps the settings' reward
    seeds: list[int] = field(default_factory=list)  # [] = the sweep's seeds
    gpus: int = 0  # GPUs per job, one process each (0: one process on the CPU)
    overrides: list[str] = field(default_factory=list)  # run config key=value, over all of the above


@dataclass
class WandbConfig:
    entity: str = ""  # "" = $WANDB_ENTITY (the environment wins)
    project: str = ""  # "" = $WANDB_PROJECT, else rsm-bench


@dataclass
class AllBaselinesConfig:
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: dict[str, MethodEntry] = field(default_factory=dict)
    cluster: cluster.ClusterConfig = field(default_factory=cluster.ClusterConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ------------------------------------------------------------------------------------------------
# Planning: every job's resolved config
# ------------------------------------------------------------------------------------------------


def load(scale: str, overrides: list[str] = ()) -> DictConfig:
    """The sweep file of ``scale`` with ``overrides``, checked (types, and each section's own checks)."""
    cfg = load_config(AllBaselinesConfig, CONFIGS / f"{scale}.yaml", overrides=overrides)
    OmegaConf.to_object(cfg)
    return cfg


def check_methods(cfg: DictConfig, chosen: list[str] | None) -> list[str]:
    """The methods to run: the sweep file must list exactly the trainable methods of the registry;
    ``chosen`` picks some of them."""
    trainable = [m.name for m in registry.trainable()]
    missing, unknown = sorted(set(trainable) - set(cfg.methods)), sorted(set(cfg.methods) - set(trainable))
    if missing or unknown:
        raise ConfigError(
            f"the sweep file must list every trainable method of baselines/registry.py once: missing "
            f"{missing}, not trainable or unknown {unknown}"
        )
    if not chosen:
        return trainable
    bad = sorted(set(chosen) - set(trainable))
    if bad:
        raise ConfigError(f"--methods {','.join(bad)}: not trainable methods; choose from {trainable}")
    return [name for name in trainable if name in chosen]


def arm_method(overrides: list[str]) -> str:
    """The method a figure's arm table entry names (its ``method=`` item)."""
    return next(item.partition("=")[2] for item in overrides if item.startswith("method="))


def family(method: Method) -> str:
    """The model family a method belongs to, e.g. "zeroth-order flow"."""
    order = "zeroth-order" if method.arm.startswith("zo_") else "first-order"
    model = "flow" if method.grid().kernel.point.prediction == "v" else "diffusion"
    return f"{order} {model}"


def settings(name: str, entry: DictConfig, scale: str) -> tuple[DictConfig, list[str], str]:
    """A method's run settings before its own: (a sweep-like config whose ``run`` is the base,
    the overrides over it, the group the reports list it under)."""
    method = trainable_method(name, f"methods.{name}")
    where = f"methods.{name}"
    if not entry.figure:
        if entry.arm or entry.family:
            raise ConfigError(f"{where}: arm / family name a figure's settings; set {where}.figure too")
        base = load_config(RunConfig, *scale_files(method, scale))
        return OmegaConf.create({"run": base}), [], family(method)
    if entry.figure not in FIGURES:
        raise ConfigError(f"{where}.figure={entry.figure!r}: choose one of {list(FIGURES)} or '' (run files)")
    arms, rows = FIGURES[entry.figure]
    figure_cfg = load_config(
        sweep.SweepConfig, Path(__file__).parent / "configs" / entry.figure / f"{scale}.yaml"
    )
    table = sweep.arm_settings(figure_cfg, arms, rows)
    if entry.arm and entry.family:
        raise ConfigError(f"{where}: set arm (a figure's arm) or family (a method in no figure), not both")
    if entry.arm:
        if entry.arm not in arms:
            raise ConfigError(
                f"{where}.arm={entry.arm!r} is no arm of {entry.figure}; its arms are {list(arms)}"
            )
        own = arm_method(arms[entry.arm]) == name
        return (
            figure_cfg,
            table[entry.arm],
            entry.figure if own else f"{family(method)} ({entry.figure} settings)",
        )
    families = {row.name: row for row in rows or []}
    if entry.family and entry.family not in families:
        raise ConfigError(f"{where}.family={entry.family!r}: {entry.figure}'s families are {list(families)}")
    overrides = list(figure_cfg.family_overrides.get(entry.family, [])) if entry.family else []
    return figure_cfg, overrides, f"{family(method)} ({entry.figure} settings)"


def budget_overrides(budget: DictConfig) -> list[str]:
    """The budget as run.loop settings, the same for every arm."""
    if budget.kind == "epochs":
        return [f"loop.epochs={int(budget.value)}"]
    return [f"loop.budget_kind={budget.kind}", f"loop.budget_limit={budget.value}"]


BUDGET_KEYS = ("loop.budget_kind", "loop.budget_limit")


def check_entry_overrides(name: str, entry: DictConfig, budget: DictConfig) -> None:
    """An entry may not change the matched budget (it would no longer be matched)."""
    keys = [*BUDGET_KEYS, *(["loop.epochs"] if budget.kind == "epochs" else [])]
    for item in entry.overrides:
        if item.partition("=")[0] in keys:
            raise ConfigError(
                f"methods.{name}.overrides: {item} would change the budget matched across arms; set "
                f"budget.kind / budget.value instead"
            )


@dataclass(frozen=True)
class Job:
    spec: cluster.JobSpec
    config: DictConfig  # resolved, read-only


def job_environment(cfg: DictConfig, environ: dict[str, str]) -> dict[str, str]:
    """wandb's entity and project for the jobs: the environment's, else the sweep file's."""
    env = {}
    for key, value in (("WANDB_ENTITY", cfg.wandb.entity), ("WANDB_PROJECT", cfg.wandb.project)):
        chosen = environ.get(key) or value
        if chosen:
            env[key] = chosen
    return env


def command(spec: cluster.JobSpec, scale: str, allow_cpu: bool) -> tuple[str, ...]:
    """The job's command line: experiments.run on its config, through experiments.launch for several
    processes (the repository's accelerate config, a free port); wandb groups it by sweep and arm and
    tags it with its seed's index."""
    arguments = ["--config", str(spec.config_file), "--name", spec.run, "--runs-dir", str(spec.sweep_dir)]
    arguments += ["--group", spec.sweep_dir.name, "--job-type", spec.method, "--scale", scale]
    arguments += ["--seed-label", str(spec.seed)]
    arguments += ["--allow-cpu"] if allow_cpu else []
    if spec.processes > 1:
        launch = ["-m", "experiments.launch", "--processes", str(spec.processes), "experiments.run"]
        head = [sys.executable, *launch]
    else:
        head = [sys.executable, "-m", "experiments.run"]
    return (*head, *arguments)


def plan(
    cfg: DictConfig,
    scale: str,
    methods: list[str],
    sweep_dir: Path,
    environ: dict[str, str],
    allow_cpu: bool = False,
) -> list[Job]:
    """Every job of the sweep with its resolved, checked config (an error names the method and key)."""
    jobs = []
    env = job_environment(cfg, environ)
    for name in methods:
        entry = cfg.methods[name]
        check_entry_overrides(name, entry, cfg.budget)
        base, overrides, group = settings(name, entry, scale)
        own = [f"model.backbone={entry.backbone}", *([f"reward={entry.reward}"] if entry.reward else [])]
        items = [*overrides, *own, *entry.overrides, *budget_overrides(cfg.budget), f"method={name}"]
        processes = max(entry.gpus, 1)
        for seed in entry.seeds or cfg.seeds:
            run = sweep.run_name(name, seed)
            config = sweep.arm_config(base, items, seed)
            spec = cluster.JobSpec(
                run=run,
                method=name,
                seed=seed,
                group=group,
                gpus=entry.gpus,
                processes=processes,
                sweep_dir=sweep_dir,
                cwd=REPO,
                env=env,
                command=(),
            )
            jobs.append(Job(replace(spec, command=command(spec, scale, allow_cpu)), config))
    return jobs


def stale_ema_notes(jobs: list[Job], budget: DictConfig) -> list[str]:
    """Runs whose evaluated weights would stop moving before an epoch budget ends. The published EMA
    (loop.ema) moves only at every loop.ema_every-th optimizer step, and the final evaluation scores
    the EMA: a budget between two of those steps shows an earlier epoch's weights as the last result."""
    if budget.kind != "epochs":
        return []
    notes = []
    for job in jobs:
        loop = job.config.loop
        steps = int(budget.value) * loop.updates_per_epoch
        missed = steps % loop.ema_every
        if loop.ema and missed:
            notes.append(
                f"{job.spec.run}: its final evaluation scores the EMA, which moves every {loop.ema_every} "
                f"optimizer steps; {int(budget.value)} epochs x {loop.updates_per_epoch} steps = {steps}, so "
                f"the last {missed} steps do not reach it (choose a budget of whole EMA periods)"
            )
    return notes


def prepare(jobs: list[Job]) -> None:
    """Refuse a run directory that holds another config (or was trained on other inputs), then write
    each job's config to <sweep>/jobs/<run>.yaml, before any job starts."""
    clashes = [
        str(job.spec.run_dir)
        for job in jobs
        if (job.spec.run_dir / "config.yaml").exists()
        and not RunRecord.matches(job.spec.run_dir, job.config, run_inputs(job.config))
    ]
    if clashes:
        raise RunExistsError(
            f"{len(clashes)} run directories hold runs of another config or other inputs: "
            f"{', '.join(clashes)}; use --name for a fresh sweep, or move them away"
        )
    for job in jobs:
        job.spec.config_file.parent.mkdir(parents=True, exist_ok=True)
        text = OmegaConf.to_yaml(job.config)
        if not job.spec.config_file.exists() or job.spec.config_file.read_text() != text:
            atomic_write_text(job.spec.config_file, text)


# ------------------------------------------------------------------------------------------------
# DRY_RUN: the jobs, their GPUs and GPU-hours, the commands and the sbatch scripts
# ------------------------------------------------------------------------------------------------


def gpu_hours(
    spec: cluster.JobSpec, budget: DictConfig, settings: cluster.ClusterConfig, where: str
) -> float | None:
    """A job's GPU-hours (see ``estimate``), or None where there is no estimate."""
    if budget.kind == "gpu_hours":
        return budget.value * (1 + budget.eval_share)
    if where == "slurm" and spec.gpus:
        return settings.timeout_min / 60 * spec.gpus
    return None


def estimate(budget: DictConfig, where: str) -> str:
    """How ``gpu_hours`` estimates a job's GPU-hours."""
    if budget.kind == "gpu_hours":
        return "budget x (1 + eval_share)"
    if where == "slurm":
        return "an upper bound per job attempt: the Slurm time limit x GPUs"
    return "none: the budget is in epochs or NFE, and a local job has no time limit"


def arrays(jobs: list[Job]) -> dict[int, list[Job]]:
    """The jobs by GPU count: one Slurm array each (an array's jobs share their resources)."""
    by_gpus: dict[int, list[Job]] = {}
    for job in jobs:
        by_gpus.setdefault(job.spec.gpus, []).append(job)
    return by_gpus


def array_name(sweep_dir: Path, gpus: int) -> str:
    return f"{sweep_dir.name}-{gpus}gpu" if gpus else f"{sweep_dir.name}-cpu"


def file_stem(group: str) -> str:
    """A group's name as a file-name part: "first-order diffusion (fig5 settings)" becomes
    "first-order-diffusion-fig5-settings" (figure ids such as fig_zo_flow stay as they are)."""
    return re.sub(r"[^A-Za-z0-9_]+", "-", group).strip("-")


def image_grids_by_group(jobs: list[Job], figures_dir: Path) -> list[Path]:
    """One image per figure or family: a row per method (its first seed's run), its evaluation images
    before and after training side by side; methods whose run has not written both are left out."""
    firsts: dict[str, dict[str, str]] = {}
    for job in sorted(jobs, key=lambda job: job.spec.seed):
        spec = job.spec
        if image_grids.has_grids(spec.run_dir):
            firsts.setdefault(spec.group, {}).setdefault(spec.method, spec.run)
    written = []
    for group, runs in firsts.items():
        out = figures_dir / f"{jobs[0].spec.sweep_dir.name}_{file_stem(group)}_images.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        written.append(image_grids.figure_grid(jobs[0].spec.sweep_dir, runs, out))
    return written


def memory_column(jobs: list[Job]) -> dict[str, str]:
    """Each paper-backbone job's per-GPU peak from `make plan`'s memory plan (its cached measurement,
    else measured now: minutes per distinct network on the CPU), against its run.gpu_memory_gb."""
    from experiments import plan as memory_plan

    cells = {}
    for job in jobs:
        settings = OmegaConf.to_object(job.config)
        if settings.model.backbone not in PAPER_BACKBONES:
            continue
        peak = memory_plan.plan(settings, memory_plan.measure(settings, use_cache=True, quiet=True)).peak
        verdict = "fits" if peak <= settings.gpu_memory_gb else "DOES NOT FIT"
        cells[job.spec.run] = f"{peak:.1f}/{settings.gpu_memory_gb:g} GiB {verdict}"
    return cells


def describe(
    jobs: list[Job],
    cfg: DictConfig,
    settings: cluster.ClusterConfig,
    where: str,
    say: Callable[[str], None],
    memory: dict[str, str] | None = None,
) -> None:
    """The plan of a sweep; ``memory``: each job's per-GPU memory plan (``memory_column``)."""
    budget = cfg.budget
    unit = {"epochs": "epochs", "nfe": "NFE", "gpu_hours": "GPU-hours of training"}[budget.kind]
    methods = len({job.spec.method for job in jobs})
    sweep_dir = jobs[0].spec.sweep_dir
    say(
        f"{sweep_dir.name} on {where}: {methods} methods, {len(jobs)} jobs, "
        f"budget {budget.value:g} {unit} per run"
    )
    if budget.kind == "gpu_hours":
        say(
            f"GPU-hours per run = budget x (1 + eval_share) = {budget.value:g} x (1 + "
            f"{budget.eval_share:g}): the budget counts training (processes x training wall-clock); "
            "evaluation, estimated as budget.eval_share of it, comes on top"
        )
    total = 0.0
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.spec.group, []).append(job)
    for group, members in groups.items():
        say(f"\n{group}")
        header = f"  {'run':<44} {'method':<36} {'GPUs':>4} {'GPU-hours':>10}"
        say(header + ("  memory per GPU (make plan)" if memory is not None else ""))
        subtotal = 0.0
        for job in members:
            hours = gpu_hours(job.spec, budget, settings, where)
            subtotal += hours or 0.0
            shown = f"{hours:10.1f}" if hours is not None else f"{'-':>10}"
            line = f"  {job.spec.run:<44} {job.spec.method:<36} {job.spec.gpus or 'cpu':>4} {shown}"
            say(line + (f"  {memory.get(job.spec.run, '-')}" if memory is not None else ""))
        say(f"  {group} total: {subtotal:.1f} GPU-hours")
        total += subtotal
    say(f"\ntotal: {len(jobs)} jobs, {sum(j.spec.gpus for j in jobs)} GPUs, {total:.1f} GPU-hours")
    say(f"GPU-hours estimate: {estimate(budget, where)}")
    say("\ncommands (each under the lock <sweep>/locks/<run>.lock, output in <sweep>/logs/<run>.log):")
    for job in jobs:
        say(f"  {' '.join(job.spec.command)}")
    if where != "slurm":
        return
    for gpus, members in arrays(jobs).items():
        params = cluster.slurm_parameters(settings, gpus, array_name(sweep_dir, gpus))
        jobs = f"an array of {len(members)} jobs" if len(members) > 1 else "one job"
        say(f"\nsbatch script of {params['job_name']} ({jobs}):")
        say(cluster.sbatch_script(sweep_dir / "slurm" / "%j", params, len(members)))


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def run_local(jobs: list[Job], grace_s: float, say: Callable[[str], None]) -> list[cluster.JobResult]:
    """The jobs one after another here; Ctrl-C (or SIGTERM) stops the current run at its epoch's end."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return list(_run_each(jobs, grace_s, say))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_each(jobs: list[Job], grace_s: float, say: Callable[[str], None]) -> Iterator[cluster.JobResult]:
    for number, job in enumerate(jobs, 1):
        spec, count = job.spec, f"[{number}/{len(jobs)}]"
        settled = already_settled(spec)
        if settled is not None:
            say(f"{count} {settled.line()}")
            yield settled
            continue
        say(f"{count} {spec.run}: starting (log {spec.log})")
        try:
            result = cluster.RunJob(spec, grace_s, say)()
        except cluster.RunFailed as failed:
            result = failed.result
        except KeyboardInterrupt:
            say(f"interrupted: {spec.run} stopped; rerun the same command to resume it")
            yield cluster.JobResult(spec.run, "preempted", "interrupted")
            return
        took = f" in {result.seconds / 60:.1f} min" if result.seconds else ""
        say(f"{count} {result.line()}{took}")
        yield result


def already_settled(spec: cluster.JobSpec) -> cluster.JobResult | None:
    """A job not worth submitting: its run is complete, or another live job holds its lock."""
    if cluster.run_state(spec.run_dir).get("state") == "complete":
        return cluster.JobResult(spec.run, "already complete")
    holder = run_locks.live_holder(spec.lock)
    if holder is not None:
        return cluster.JobResult(spec.run, "running elsewhere", str(run_locks.LockBusy(holder)))
    return None


def run_slurm(
    jobs: list[Job], settings: cluster.ClusterConfig, wait: bool, poll_s: float, say: Callable[[str], None]
) -> list[cluster.JobResult]:
    """One job array per GPU count; then (``wait``) the results as the jobs end."""
    results, pending = [], []
    for job in jobs:
        settled = already_settled(job.spec)
        if settled is not None:
            say(settled.line())
            results.append(settled)
    todo = [job for job in jobs if job.spec.run not in {r.run for r in results}]
    for gpus, members in arrays(todo).items():
        sweep_dir = members[0].spec.sweep_dir
        params = cluster.slurm_parameters(settings, gpus, array_name(sweep_dir, gpus))
        grace = cluster.grace_seconds(settings)
        submitted = cluster.submit(
            sweep_dir / "slurm" / "%j",
            params,
            [cluster.RunJob(job.spec, grace) for job in members],
            settings.max_requeues,
        )
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for job, handle in zip(members, submitted, strict=True):
            atomic_write_text(
                job.spec.submitted_file, json.dumps({"job_id": handle.job_id, "submitted": now}) + "\n"
            )
            pending.append((job.spec, handle))
        say(
            f"submitted {params['job_name']}: {len(members)} jobs, "
            f"job ids {submitted[0].job_id} .. {submitted[-1].job_id}"
        )
    if not wait:
        say("not waiting for the jobs (--no-wait): `make sweep-status` shows them")
        return results + [cluster.JobResult(spec.run, "submitted", handle.job_id) for spec, handle in pending]
    try:
        while pending:
            for spec, handle in list(pending):
                if handle.done():
                    result = cluster.collect(spec, handle)
                    say(f"[job {handle.job_id}] {result.line()}")
                    results.append(result)
                    pending.remove((spec, handle))
            if pending:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        say(f"stopped waiting; {len(pending)} jobs keep running on Slurm: `make sweep-status` shows them")
        results += [cluster.JobResult(spec.run, "submitted", handle.job_id) for spec, handle in pending]
    return results


def report(
    results: list[cluster.JobResult],
    sweep_dir: Path,
    table: Path | None,
    minutes: float,
    say: Callable[[str], None],
) -> None:
    """The one-line summary and the failed jobs with their details; exits non-zero naming them (1), or
    with experiments.run's PREEMPTED_EXIT (75) when a run stopped early and a rerun resumes it."""
    counts: dict[str, int] = {}
    for result in results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    tally = ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
    where = f"runs in {sweep_dir}, logs in {sweep_dir / 'logs'}, " + (
        f"table {table}" if table else "no table (no run has started)"
    )
    say(f"{sweep_dir.name} done in {minutes:.1f} min: {tally}; {where}")
    failed = [r for r in results if r.outcome == "failed"]
    for result in failed:
        say(f"FAILED {result.run}: {result.detail}")
    if failed:
        raise SystemExit(f"error: {len(failed)} job(s) failed: {', '.join(r.run for r in failed)}")
    stopped = [r.run for r in results if r.outcome == "preempted"]
    if stopped:
        say(f"stopped early: {', '.join(stopped)}; rerun the same command to resume")
        raise SystemExit(cluster.PREEMPTED_EXIT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", default="tiny", help=f"smoke | tiny | paper ({CONFIGS}/*.yaml)")
    parser.add_argument("--cluster", choices=("local", "slurm"), default="local")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the jobs, GPU-hours and sbatch scripts; run nothing"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a sweep file key"
    )
    parser.add_argument("--methods", default="", help="comma-separated methods to run (default: all)")
    parser.add_argument("--name", help="sweep directory under --runs-dir (default: all_baselines-<scale>)")
    parser.add_argument("--runs-dir", type=Path, default=Path("results/runs"))
    parser.add_argument("--table", type=Path, default=TABLE, help="the results table written after the sweep")
    parser.add_argument(
        "--figures-dir", type=Path, default=Path("results/figures"), help="where the image grids go"
    )
    parser.add_argument("--no-wait", action="store_true", help="slurm: return once the jobs are submitted")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="dry run: add each job's per-GPU memory plan (make plan's; minutes without its cache)",
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=30.0, help="slurm: how often to look at the jobs"
    )
    parser.add_argument(
        "--allow-cpu", action="store_true", help="run paper-scale models without a GPU (tests)"
    )
    args = parser.parse_args(argv)

    cfg = load(args.scale, args.set)
    methods = check_methods(cfg, [m for m in args.methods.split(",") if m])
    settings = cluster.with_environment(OmegaConf.to_object(cfg).cluster)
    too_big = [name for name in methods if cfg.methods[name].gpus > settings.gpus_per_node]
    if args.cluster == "slurm" and too_big:
        raise ConfigError(
            f"{', '.join(too_big)} need more GPUs than a node has (cluster.gpus_per_node="
            f"{settings.gpus_per_node}, or RSM_SLURM_GPUS_PER_NODE)"
        )
    sweep_dir = (args.runs_dir / (args.name or f"all_baselines-{args.scale}")).absolute()
    jobs = plan(cfg, args.scale, methods, sweep_dir, dict(os.environ), args.allow_cpu)
    say = lambda line: print(line, flush=True)  # noqa: E731
    for note in stale_ema_notes(jobs, cfg.budget):
        say(f"note: {note}")
    if args.dry_run:
        describe(jobs, cfg, settings, args.cluster, say, memory_column(jobs) if args.plan else None)
        return
    prepare(jobs)
    started = time.perf_counter()
    if args.cluster == "local":
        results = run_local(jobs, cluster.grace_seconds(settings), say)
    else:
        results = run_slurm(jobs, settings, not args.no_wait, args.poll_seconds, say)
    started_runs = any((job.spec.run_dir / "status.json").exists() for job in jobs)
    table = write_summary(sweep_dir, out=args.table) if started_runs else None
    for grid in image_grids_by_group(jobs, args.figures_dir / ("" if args.scale == "tiny" else args.scale)):
        say(f"evaluation images side by side: {grid}")
    report(results, sweep_dir, table, (time.perf_counter() - started) / 60, say)


if __name__ == "__main__":
    run_cli(main)
