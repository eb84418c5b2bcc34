"""`make sweep-status`: one table of a sweep's runs, read from their directories (and Slurm's queue).

    python -m experiments.sweep_status --scale tiny            # results/runs/all_baselines-tiny
    python -m experiments.sweep_status --sweep DIR

A row per job the sweep planned (``<sweep>/jobs/<run>.yaml``) and per run directory: its state,
epochs done, last evaluation reward, GPU-hours, and the Slurm job and its state where there is one.
The state is the run's own (status.json) unless its lock says more:

- running: a live job holds the run's lock (experiments.run_locks);
- complete / failed / preempted: what status.json says;
- interrupted: status.json says running but no live job holds the lock (killed without a chance to
  write its state; rerunning the sweep resumes it);
- queued: no run directory yet, and Slurm lists its job as pending;
- not started: no run directory and no queued job.

The Slurm job is the lock holder's, else the one the sweep submitted (``<sweep>/jobs/<run>.submitted.json``);
its state is sacct's or squeue's (experiments.cluster.slurm_states), blank without Slurm.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from experiments import run_locks
from experiments.cli import run as run_cli
from experiments.cluster import run_state, slurm_states

QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING"}


@dataclass(frozen=True)
class Row:
    run: str
    state: str
    epochs: int | None
    eval_reward: float | None
    gpu_hours: float | None
    job_id: str
    slurm: str


def runs_of(sweep_dir: Path) -> list[str]:
    """The sweep's runs: every planned job and every run directory, in name order."""
    planned = {path.name.removesuffix(".yaml") for path in (sweep_dir / "jobs").glob("*.yaml")}
    directories = {path.parent.name for path in sweep_dir.glob("*/status.json")}
    return sorted(planned | directories)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line a killed run was writing
    return rows


def submitted_job(sweep_dir: Path, run: str) -> str:
    try:
        return json.loads((sweep_dir / "jobs" / f"{run}.submitted.json").read_text())["job_id"]
    except (FileNotFoundError, ValueError, KeyError):
        return ""


def rows(sweep_dir: Path, states: Callable[[list[str]], dict[str, str]] = slurm_states) -> list[Row]:
    sweep_dir = Path(sweep_dir)
    found = []
    for run in runs_of(sweep_dir):
        holder = run_locks.live_holder(sweep_dir / "locks" / f"{run}.lock")
        job_id = holder.job_id if holder else submitted_job(sweep_dir, run)
        found.append((run, holder, job_id))
    slurm = states([job for _, _, job in found if job and not job.startswith(run_locks.LOCAL_PREFIX)])
    table = []
    for run, holder, job_id in found:
        run_dir = sweep_dir / run
        status, history = run_state(run_dir), metrics(run_dir)
        evaluated = [row["eval_reward"] for row in history if "eval_reward" in row]
        gpu_hours = [row["gpu_hours"] for row in history if "gpu_hours" in row]
        state = status.get("state", "")
        if holder is not None:
            state = "running"
        elif state == "running":
            state = "interrupted"
        elif not state:
            state = "queued" if slurm.get(job_id) in QUEUED else "not started"
        table.append(
            Row(
                run,
                state,
                max((row["epoch"] for row in history), default=None),
                evaluated[-1] if evaluated else None,
                gpu_hours[-1] if gpu_hours else None,
                job_id,
                slurm.get(job_id, ""),
            )
        )
    return table


def _cell(value: float | int | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(table: list[Row]) -> str:
    header = (
        f"{'run':<44} {'state':<12} {'epochs':>6} {'eval reward':>11} {'GPU-hours':>9}  {'job':<14} slurm"
    )
    lines = [header, "-" * len(header)]
    for row in table:
        lines.append(
            f"{row.run:<42} {row.state:<12} {_cell(row.epochs, 0):>6} {_cell(row.eval_reward, 4):>11} "
            f"{_cell(row.gpu_hours, 2):>9}  {row.job_id or '-':<14} {row.slurm or '-'}"
        )
    counts: dict[str, int] = {}
    for row in table:
        counts[row.state] = counts.get(row.state, 0) + 1
    hours = sum(row.gpu_hours or 0.0 for row in table)
    tally = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    lines.append(f"{len(table)} runs: {tally}; {hours:.2f} GPU-hours so far")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", default="tiny", help="the sweep results/runs/all_baselines-<scale>")
    parser.add_argument("--sweep", type=Path, help="a sweep directory (instead of --scale)")
    args = parser.parse_args(argv)
    sweep_dir = args.sweep or Path("results/runs") / f"all_baselines-{args.scale}"
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep at {sweep_dir}: run `make all-baselines SCALE={args.scale}` first")
    print(render(rows(sweep_dir)))


if __name__ == "__main__":
    run_cli(main)
