"""Figures from logged runs: each reads run directories (metrics.jsonl, the source of truth) or their
wandb mirror, never stdout or memory.

    python -m experiments.plot --source runs --sweep results/runs/fig3-tiny   # a sweep's figure(s)
    python -m experiments.plot --source wandb --group fig3-tiny               # the same from wandb
    python -m experiments.plot fig-toy RUN_DIR [--out STEM]                   # the toy figure of a run

A sweep directory and its wandb group share one name, <sweep>-<scale> (e.g. fig3-smoke, or
first-order-tiny, which Figures 5 and 6 share); it says which figure(s) to draw (else --figure) and
where they go, as `make fig3` writes them. In wandb each run's job type is its arm and its tag
"seed:<n>" its seed index. Both sources give the same CSV: only finished runs are drawn, and the
others are listed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import matplotlib

from experiments.cli import run
from rsm_core.config import ConfigError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from rsm_core.records import RunRecord, atomic_write_text, read_metrics  # noqa: E402

if TYPE_CHECKING:
    from experiments.sweep import Figure

TOY_PANELS = (
    ("b", "(b) first order vs full-rollout zeroth order"),
    ("c-i first order", "(c-i) lookahead depth, first order"),
    ("c-i zeroth order", "(c-i) lookahead depth, zeroth order"),
    ("c-ii", "(c-ii) branching (#split, #branch)"),
    ("c-iii", "(c-iii) stochasticity localisation"),
)


def toy_frame(run_dir: Path) -> pd.DataFrame:
    """The toy study's long-format rows of a finished run."""
    return pd.DataFrame(read_metrics(run_dir))


def plot_fig_toy(frame: pd.DataFrame, out_stem: Path, title: str = "") -> list[Path]:
    """RMSE of every estimator against NFE per estimate, one axis per panel; writes .png, .pdf and .csv."""
    fig, axes = plt.subplots(
        1, len(TOY_PANELS), figsize=(4.2 * len(TOY_PANELS), 3.8), constrained_layout=True
    )
    for ax, (panel, panel_title) in zip(axes, TOY_PANELS, strict=True):
        rows = frame[frame["panel"] == panel]
        sampled = rows[~rows["sample_free"].astype(bool)]
        for curve, part in sampled.groupby("curve", sort=False):
            ax.plot(part["nfe"], part["rmse"], marker="o", ms=3, label=curve)
        for curve, part in rows[rows["sample_free"].astype(bool)].groupby("curve", sort=False):
            nfe = part["nfe"].iloc[0]
            ax.axhline(
                part["rmse"].iloc[0],
                ls="--",
                lw=1.2,
                color="0.3" if "SQDF" not in curve else "0.6",
                label=f"{curve} ({nfe:g} NFE)",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE per estimate")
        target = "own large-N estimate" if (rows["target"] == "own-reference").any() else "soft ground truth"
        ax.set_ylabel(f"RMSE vs {target}" if panel == "c-iii" else "RMSE vs soft ground truth")
        # the worst few small-N points may leave the frame; the reference lines always stay in it
        top = max(
            sampled["rmse"].quantile(0.95) if not sampled.empty else 0.0,
            rows.loc[rows["sample_free"].astype(bool), "rmse"].max() if rows["sample_free"].any() else 0.0,
        )
        ax.set_ylim(0, top * 1.15 if math.isfinite(top) and top > 0 else None)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, frame, out_stem)


# No creation date or software version in the files: the same data gives the same bytes, so a rerun
# with the same inputs leaves `git status` clean.
METADATA = {".png": {"Software": None}, ".pdf": {"Creator": None, "Producer": None, "CreationDate": None}}


def save_figure(fig: plt.Figure, frame: pd.DataFrame, out_stem: Path) -> list[Path]:
    """Write STEM.png, STEM.pdf and the figure's data as STEM.csv, each atomically."""
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".pdf")]
    for path in paths:
        tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
        fig.savefig(tmp, dpi=150, metadata=METADATA[path.suffix])
        tmp.replace(path)
    plt.close(fig)
    csv = out_stem.with_suffix(".csv")
    atomic_write_text(csv, frame.to_csv(index=False))
    return [*paths, csv]


# ------------------------------------------------------------------------------------------------
# Sweep figures from run directories or wandb
# ------------------------------------------------------------------------------------------------

SCALES = ("smoke", "tiny", "paper", "1gpu")
DEFAULT_PROJECT = "rsm-bench"
Runs = dict[tuple[str, int], list[dict[str, Any]]]  # (arm, seed index) -> metrics rows


class NoRunsError(ConfigError):
    """The source holds no finished run of the figure(s) asked for."""


def sweep_figures() -> dict[str, Figure]:
    """The figures drawn from sweeps, by name (imported on use: they import this module's
    save_figure through experiments.sweep)."""
    from experiments import fig3, fig5, fig6, fig_zo_diffusion, fig_zo_flow

    return {module.FIGURE.name: module.FIGURE for module in (fig3, fig_zo_flow, fig_zo_diffusion, fig5, fig6)}


def figures_of(sweep_name: str, figure: str | None = None) -> tuple[list[Figure], str]:
    """The figure(s) of a sweep directory or wandb group named <sweep>-<scale> (``figure``: the one
    named), and the scale its files are filed under (the whole name if it ends in no scale)."""
    figures = sweep_figures()
    stem, _, scale = sweep_name.rpartition("-")
    if scale not in SCALES:
        stem, scale = sweep_name, sweep_name
    if figure is not None:
        if figure not in figures:
            raise ConfigError(f"unknown figure {figure!r}; choose one of {sorted(figures)}")
        return [figures[figure]], scale
    chosen = [f for f in figures.values() if f.sweep == stem]
    if not chosen:
        sweeps = sorted({f.sweep for f in figures.values()})
        raise ConfigError(
            f"cannot tell the figure of {sweep_name!r}: not named <sweep>-<scale> with a sweep of {sweeps}; "
            f"name it with --figure (one of {sorted(figures)})"
        )
    return chosen, scale


def arms_of(figures: list[Figure]) -> list[str]:
    """Every arm of the figures, once (Figures 5 and 6 share their redesign arms)."""
    return list(dict.fromkeys(arm for figure in figures for arm in figure.arms))


def _state(run_dir: Path) -> str:
    status = run_dir / "status.json"
    return json.loads(status.read_text()).get("state", "?") if status.exists() else "no status.json"


def directory_runs(sweep: Path, arms: Iterable[str]) -> tuple[Runs, list[str]]:
    """The metrics rows of each complete run of ``arms`` in a sweep directory (runs named
    sweep.run_name(arm, seed)), and a note for each run of theirs left out (unfinished or failed)."""
    from experiments.sweep import run_name  # on use: experiments.sweep imports this module

    if not sweep.is_dir():
        raise FileNotFoundError(f"no sweep directory {sweep}; give the directory a figure's runs are in")
    runs: Runs = {}
    left_out = []
    for arm in arms:
        pattern = re.compile(re.escape(run_name(arm, 0)).removesuffix("0") + r"(\d+)")
        matches = (pattern.fullmatch(path.name) for path in sweep.iterdir() if path.is_dir())
        for seed in sorted(int(match.group(1)) for match in matches if match):
            path = sweep / run_name(arm, seed)
            if RunRecord.is_complete(path):
                runs[(arm, seed)] = read_metrics(path)
            else:
                left_out.append(f"{path.name} ({_state(path)})")
    return runs, left_out


class WandbRun(Protocol):
    """What is read of a run of ``wandb.Api().runs``."""

    name: str
    id: str
    job_type: str
    tags: list[str]
    state: str

    def scan_history(self) -> Iterable[dict[str, Any]]: ...


class WandbApi(Protocol):
    def runs(self, path: str, filters: dict[str, Any]) -> Iterable[WandbRun]: ...


def wandb_path(entity: str | None, project: str | None) -> str:
    """entity/project: the arguments, else $WANDB_ENTITY / $WANDB_PROJECT (as the runs logged them),
    else the login's default entity and the project rsm-bench."""
    entity = entity or os.environ.get("WANDB_ENTITY")
    project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    return f"{entity}/{project}" if entity else project


def wandb_api() -> WandbApi:
    import wandb

    try:
        return wandb.Api()
    except wandb.errors.UsageError as error:
        raise ConfigError(
            f"wandb.Api() did not start ({error}); log in with `wandb login` or set WANDB_API_KEY"
        ) from None


def history_rows(run: WandbRun) -> list[dict[str, Any]]:
    """A wandb run's logged rows keyed as metrics.jsonl (wandb's own _step, _runtime, ... and the keys
    a row did not log dropped), one per epoch in epoch order; an epoch logged twice (a resumed run
    redoes the epochs after its checkpoint) keeps its last row, as metrics.jsonl does."""
    by_epoch = {}
    for row in run.scan_history():
        clean = {k: v for k, v in row.items() if not k.startswith("_") and v is not None}
        if "epoch" in clean:
            by_epoch[clean["epoch"]] = clean
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _seed(tags: Iterable[str]) -> int | None:
    seeds = [int(tag[len("seed:") :]) for tag in tags if re.fullmatch(r"seed:\d+", tag)]
    return seeds[0] if len(seeds) == 1 else None


def wandb_runs(api: WandbApi, path: str, group: str, arms: Iterable[str]) -> tuple[Runs, list[str]]:
    """``directory_runs`` from wandb: the finished runs of ``group`` in project ``path`` whose job type
    is one of ``arms``, each with its seed index from its tag seed:<n>."""
    found = list(api.runs(path, filters={"group": group}))
    if not found:
        raise NoRunsError(
            f"wandb has no runs in group {group!r} of project {path!r}. Runs log offline unless "
            f"WANDB_MODE=online: upload them first with `wandb sync results/runs/{group}/*/wandb/wandb/"
            "offline-run-*` (each run directory keeps its wandb run under wandb/), or check --entity and "
            "--project (default: $WANDB_ENTITY, $WANDB_PROJECT)"
        )
    wanted = set(arms)
    runs: Runs = {}
    ids: dict[tuple[str, int], str] = {}
    left_out = []
    for wandb_run in found:
        if wandb_run.job_type not in wanted:
            continue
        seed = _seed(wandb_run.tags)
        if seed is None:
            left_out.append(f"{wandb_run.name} (no single seed:<n> tag in {list(wandb_run.tags)})")
            continue
        if wandb_run.state != "finished":
            left_out.append(f"{wandb_run.name} ({wandb_run.state})")
            continue
        key = (wandb_run.job_type, seed)
        if key in ids:
            raise ConfigError(
                f"two finished wandb runs of {key[0]} seed {seed} in group {group!r}: {ids[key]} and "
                f"{wandb_run.id}; delete the stale one in wandb (a run directory names its id in wandb.json)"
            )
        ids[key] = wandb_run.id
        runs[key] = history_rows(wandb_run)
    return runs, left_out


def draw_figures(
    figures: list[Figure],
    runs: Runs,
    figures_dir: Path,
    scale: str,
    sweep: Path | None = None,
    compute: str | None = None,
) -> list[Path]:
    """Each figure from the runs of its arms (arms in the figure's order, seeds ascending), drawn as
    its sweep draws it; with ``sweep`` (run directories) also its start | end image grid."""
    paths = []
    for figure in figures:
        mine = {key: runs[key] for arm in figure.arms for key in sorted(k for k in runs if k[0] == arm)}
        if not mine:
            print(f"{figure.name}: no finished run of its arms {list(figure.arms)}; not drawn")
            continue
        paths += figure.draw(figure.frame(mine), figures_dir, scale, sweep, compute)
    if not paths:
        raise NoRunsError(f"no finished run of {[f.name for f in figures]}; nothing drawn")
    return paths


def main(argv: list[str] | None = None, api: WandbApi | None = None) -> None:
    """``api``: the wandb API to read (default: ``wandb.Api()``)."""
    from experiments.sweep import COMPUTE_AXES  # sweep imports this module: read it at call time

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=("runs", "wandb"), help="where a sweep figure's runs are read")
    parser.add_argument("--sweep", type=Path, help="runs: the sweep directory, e.g. results/runs/fig3-tiny")
    parser.add_argument("--group", help="wandb: the runs' group, the sweep directory's name (e.g. fig3-tiny)")
    parser.add_argument("--figure", help="the figure to draw (default: the sweep's, from its name)")
    parser.add_argument("--entity", help="wandb entity (default: $WANDB_ENTITY, else your default entity)")
    parser.add_argument("--project", help=f"wandb project (default: $WANDB_PROJECT, else {DEFAULT_PROJECT})")
    parser.add_argument("--figures-dir", type=Path, default=Path("results/figures"))
    parser.add_argument(
        "--x",
        choices=sorted(COMPUTE_AXES),
        help="the compute axis of the wall-clock panel (files end in _<x>; default: the figure's own)",
    )
    sub = parser.add_subparsers(dest="command")
    toy = sub.add_parser("fig-toy", help="the toy value-gradient-estimator figure")
    toy.add_argument("run_dir", type=Path)
    toy.add_argument(
        "--out", type=Path, default=Path("results/figures/fig_toy"), help="output path without suffix"
    )
    args = parser.parse_args(argv)
    if args.command == "fig-toy":
        paths = plot_fig_toy(toy_frame(args.run_dir), args.out, title=args.run_dir.name)
    elif args.source == "runs" and args.sweep is not None:
        figures, scale = figures_of(args.sweep.name, args.figure)
        runs, left_out = directory_runs(args.sweep, arms_of(figures))
        for note in left_out:
            print(f"left out, not complete: {note}")
        paths = draw_figures(figures, runs, args.figures_dir, scale, args.sweep, args.x)
    elif args.source == "wandb" and args.group:
        figures, scale = figures_of(args.group, args.figure)
        path = wandb_path(args.entity, args.project)
        runs, left_out = wandb_runs(api or wandb_api(), path, args.group, arms_of(figures))
        for note in left_out:
            print(f"left out, not finished: {note}")
        paths = draw_figures(figures, runs, args.figures_dir, scale, compute=args.x)
    else:
        parser.error("give --source runs --sweep DIR, --source wandb --group G, or fig-toy RUN_DIR")
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    run(main)
