"""results/tables/all_baselines.md: every method of a sweep at its matched budget, beside the paper.

    python -m experiments.summary results/runs/all_baselines-tiny [--out results/tables/all_baselines.md]

One row per method (the ``method`` of a run's config.yaml; its runs are its seeds): at each run's
final evaluation, the evaluation reward, the divergence from the reference (KL, eval_kl, where the
method's sampler has one; transition drift, eval_drift, for the first-order flow arms trained on the
ODE), the cumulative NFE and the GPU-hours (``gpu_hours`` = processes x wall-clock; runs that did not
log it show single-process wall-clock hours, marked), each as the mean over seeds with the min-max and
n. Only complete runs are averaged; every other run is listed with its state and error. Beside each
method: the paper's reported direction (``DIRECTIONS``, or the caller's mapping, e.g. a sweep config's
``paper_direction``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from baselines import registry
from baselines.method import Family
from experiments.cli import run as run_cli
from rsm_core.records import atomic_write_text, read_metrics

# What the paper reports for the arms of its figures (its section 5 and appendix F.1), under matched
# compute; other methods get their family's line (``paper_direction``).
DIRECTIONS = {
    "tempflow-grpo": "baseline of Fig. 3 and of the GenEval run (Fig. 16a)",
    "uniform-reallocation": "Fig. 3: above TempFlow-GRPO",
    "equal-variance-reallocation": "Fig. 3: best; faster reward at a comparable reward-KL tradeoff",
    "lowsnr2-matching-fairclip2": "Fig. 16a: a wall-clock speedup over TempFlow-GRPO on GenEval",
    "pcpo-reweight": "baseline of Fig. 16b, c",
    "sparse-branching": "Fig. 16b, c: more efficient than PCPO, better reward-KL tradeoff",
    "vgg-flow": "baseline of Fig. 5a, b (pruned)",
    "vgg-flow-unpruned": "Fig. 5b: the original; removing its value network does not hurt",
    "reward-score-distillation-flow": "Fig. 5a, b: much faster reward than VGG-Flow, competitive drift",
    "residual-nabla-db": "baseline of Fig. 5c, d (pruned)",
    "reward-score-distillation-diffusion": "Fig. 5c, d: much faster reward than Residual nabla-DB, "
    "competitive KL",
    "vgg-flow-linear-a": "Fig. 6a, b ablation: below the flow redesign (weighting alone is not the gain)",
    "vgg-flow-linear-b": "Fig. 6a, b ablation: below the flow redesign (weighting alone is not the gain)",
    "nabla-db-estimator-ablation": "Fig. 6c, d ablation: below the diffusion redesign",
}
FAMILY_DIRECTIONS = {
    Family.BASELINE: "published baseline (no figure of its own in the paper)",
    Family.REDESIGN: "a redesign variant (no figure of its own in the paper)",
}


def paper_direction(method: str, directions: Mapping[str, str] | None = None) -> str:
    """The caller's text for ``method``, else the paper's (``DIRECTIONS``), else its registry family's."""
    if directions and method in directions:
        return directions[method]
    if method in DIRECTIONS:
        return DIRECTIONS[method]
    try:
        return FAMILY_DIRECTIONS[registry.get(method).family]
    except KeyError:
        return "not a registered method"


@dataclass(frozen=True)
class Final:
    """A complete run's final evaluation and the compute spent by then."""

    reward: float
    divergence: float
    divergence_kind: str  # "KL" or "drift"
    nfe: float
    gpu_hours: float
    gpu_hours_logged: bool  # False: wallclock_h stands in


@dataclass(frozen=True)
class RunInfo:
    name: str
    method: str
    state: str
    status: dict[str, Any]
    budget: str
    final: Final | None  # complete runs only


def _budget(loop: Mapping[str, Any]) -> str:
    """The run's compute budget as its config states it (loop.budget_kind and budget_limit, or epochs)."""
    kind, limit = loop.get("budget_kind", "epochs"), loop.get("budget_limit", 0)
    if kind == "epochs" or not limit:
        return f"{loop['epochs']} epochs"
    return f"{kind} {limit:g} (at most {loop['epochs']} epochs)"


def _final(rows: list[dict[str, Any]], run_dir: Path) -> Final:
    evaluated = [row for row in rows if "eval_reward" in row]
    if not evaluated:
        raise ValueError(f"{run_dir} is complete but logged no evaluation (no eval_reward in metrics.jsonl)")
    row = evaluated[-1]
    kind, key = ("KL", "eval_kl") if "eval_kl" in row else ("drift", "eval_drift")
    logged = "gpu_hours" in row
    return Final(
        reward=row["eval_reward"],
        divergence=row.get(key, math.nan),
        divergence_kind=kind,
        nfe=row["nfe"],
        gpu_hours=row["gpu_hours"] if logged else row["wallclock_h"],
        gpu_hours_logged=logged,
    )


def read_runs(sweep_dir: Path) -> list[RunInfo]:
    """Every run directory of the sweep (a folder with config.yaml and status.json), by name."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep directory {sweep_dir}")
    runs = []
    for path in sorted(sweep_dir.iterdir()):
        if not ((path / "config.yaml").is_file() and (path / "status.json").is_file()):
            continue  # the sweep's own folders (job configs, locks, logs)
        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
        status = json.loads((path / "status.json").read_text())
        state = status.get("state", "?")
        final = _final(read_metrics(path), path) if state == "complete" else None
        runs.append(RunInfo(path.name, config["method"], state, status, _budget(config["loop"]), final))
    if not runs:
        raise FileNotFoundError(
            f"{sweep_dir} holds no run directories (folders with config.yaml and status.json)"
        )
    return runs


def _spread(values: list[float]) -> str:
    """mean (min-max) of the seeds; a single seed shows its value."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return "n/a" if not finite else f"{_spread(finite)}, {len(values) - len(finite)} not finite"
    mean = sum(values) / len(values)
    return f"{mean:.4g}" if len(values) == 1 else f"{mean:.4g} ({min(values):.4g}-{max(values):.4g})"


def _order(method: str) -> tuple[int, str]:
    names = [m.name for m in registry.METHODS]
    return (names.index(method) if method in names else len(names), method)


def summary_markdown(sweep_dir: Path, directions: Mapping[str, str] | None = None) -> str:
    """The table (and the runs not averaged) as markdown."""
    runs = read_runs(sweep_dir)
    complete = [r for r in runs if r.final is not None]
    budgets = sorted({r.budget for r in complete})
    lines = [
        f"# Matched-compute summary: {Path(sweep_dir).name}",
        "",
        f"Budget: {budgets[0]} for every run."
        if len(budgets) == 1
        else f"Budgets differ: {'; '.join(budgets)}.",
        "Values at each run's final evaluation: mean over seeds (min-max); n = complete seeds.",
        *(
            ["Methods with n < 3 have no seed spread to compare against: their differences are not results."]
            if any(sum(r.method == c.method for r in complete) < 3 for c in complete)
            else []
        ),
        "",
        "| method | n | eval reward | KL / drift to the reference | NFE | GPU-hours | paper's direction |",
        "|---|---|---|---|---|---|---|",
    ]
    stand_in = False
    for method in sorted({r.method for r in complete}, key=_order):
        finals = [r.final for r in complete if r.method == method and r.final is not None]
        kinds = "/".join(sorted({f.divergence_kind for f in finals}))
        hours = _spread([f.gpu_hours for f in finals])
        if not all(f.gpu_hours_logged for f in finals):
            hours, stand_in = f"{hours} *", True
        cells = [
            method,
            str(len(finals)),
            _spread([f.reward for f in finals]),
            f"{kinds} {_spread([f.divergence for f in finals])}",
            _spread([f.nfe for f in finals]),
            hours,
            paper_direction(method, directions),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not complete:
        lines.append("| (no complete run) | 0 | | | | | |")
    if stand_in:
        lines += [
            "",
            "\\* no `gpu_hours` logged (runs before it was): single-process wall-clock hours shown.",
        ]
    others = [r for r in runs if r.final is None]
    if others:
        lines += [
            "",
            "Not averaged (not complete):",
            "",
            "| run | method | state | epoch | error |",
            "|---|---|---|---|---|",
        ]
        for r in others:
            epoch = r.status.get("epoch", _last_epoch(Path(sweep_dir) / r.name))
            error = str(r.status.get("error", "")).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r.name} | {r.method} | {r.state} | {epoch} | {error} |")
    return "\n".join(lines) + "\n"


def _last_epoch(run_dir: Path) -> str:
    rows = read_metrics(run_dir, allow_incomplete=True)
    return str(rows[-1]["epoch"]) if rows else "-"


def write_summary(sweep_dir: Path, out: Path, directions: Mapping[str, str] | None = None) -> Path:
    """Write the sweep's summary table to ``out`` (atomically); ``directions``: method -> the paper's
    reported direction, over ``DIRECTIONS``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, summary_markdown(sweep_dir, directions))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sweep_dir", type=Path, help="a sweep directory, e.g. results/runs/all_baselines-tiny"
    )
    parser.add_argument("--out", type=Path, default=Path("results/tables/all_baselines.md"))
    args = parser.parse_args(argv)
    print(f"wrote {write_summary(args.sweep_dir, args.out)}")


if __name__ == "__main__":
    run_cli(main)
