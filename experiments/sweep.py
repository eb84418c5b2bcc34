"""A figure's arms x seeds under matched compute, and their reward curves.

A figure (`make fig3`, `make fig-zo-flow`) is a table of arms on top of a scale file: each arm names
a registered method (and at most a few settings of its own), the scale file says how big every run
is. This module runs the table (reusing finished runs, resuming unfinished ones), collects the
evaluation rows of every run in long format and draws reward against wall-clock and against KL: the
mean over seeds and, as the band, the seed spread (min to max).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from experiments import image_grids
from experiments.run import RunConfig, resolve, run, run_identity, run_inputs, sections
from rsm_core.config import ConfigError, apply_override, load_config, require
from rsm_core.records import RunExistsError, RunRecord, read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.plot import save_figure  # noqa: E402

COLUMNS = ["arm", "seed", "epoch", "wallclock_h", "gpu_hours", "nfe", "kl", "reward", "train_reward"]


@dataclass
class SweepConfig:
    run: RunConfig = field(default_factory=RunConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=list)  # empty: every arm of the figure
    # this scale's settings of every arm of one row of a two-family figure (`make fig5`: the row's
    # model family, e.g. its backbone and optimiser), keyed by the row's name, over the arm table
    family_overrides: dict[str, list[str]] = field(default_factory=dict)
    # this scale's settings of single arms, over the above (e.g. the tiny world's re-tuned reward
    # scales, which differ per method as the published ones do)
    arm_overrides: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(len(self.seeds) >= 1, "seeds", "name at least one seed")
        require(len(set(self.seeds)) == len(self.seeds), "seeds", "every seed once")


# Figures 5 and 6 share their redesign arms (same settings at every scale): one sweep directory
FIRST_ORDER_RUNS = "first-order"


def run_name(arm: str, seed: int) -> str:
    return f"{arm.lower().replace(' ', '-')}-seed{seed}"


def arm_config(cfg: SweepConfig | DictConfig, overrides: list[str], seed: int) -> DictConfig:
    """One run's resolved config: the scale's run settings, the arm's own settings, its seed.

    Seed index s runs with base seed + 1000 s, so every seed of every arm draws its own noise.
    """
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg.run)
    for item in [*overrides, f"seed={cfg.run.seed + 1000 * seed}"]:
        merged = apply_override(merged, item)
    return resolve(merged, prefix="run.")


def arm_settings(
    cfg: SweepConfig | DictConfig, arms: dict[str, list[str]], rows: list[PanelRow] | None = None
) -> dict[str, list[str]]:
    """Every arm's overrides: the figure's arm table, its row's ``family_overrides``, its
    ``arm_overrides`` (later ones win); a name that is no arm or row of the figure is an error."""
    family = {arm: row.name for row in rows or [] for arm in row.arms}
    unknown_arms = sorted(set(cfg.arm_overrides) - set(arms))
    unknown_rows = sorted(set(cfg.family_overrides) - {row.name for row in rows or []})
    if unknown_arms or unknown_rows:
        raise ConfigError(
            f"unknown arms {unknown_arms} / families {unknown_rows} in the scale file; the figure's arms are "
            f"{list(arms)} and its families {[row.name for row in rows or []]}"
        )
    return {
        arm: [*items, *cfg.family_overrides.get(family.get(arm, ""), []), *cfg.arm_overrides.get(arm, [])]
        for arm, items in arms.items()
    }


def check_overrides(
    user: list[str], table: dict[str, list[str]], figure: str, arms: dict[str, DictConfig]
) -> None:
    """Refuse a user's ``run.*`` override that the figure would silently undo or that would erase what
    its arms are about: a key the arm table sets per arm, or a setting in which the arms' resolved
    configs (``arms``, resolved without the user's run overrides) differ — e.g. each method's own
    branching profile."""
    per_arm = {item.partition("=")[0] for overrides in table.values() for item in overrides}
    hint = (
        "Pick arms with --set arms=[...], or train one run with your own settings with "
        "`python -m experiments.run METHOD --set ...`"
    )
    for item in user:
        key = item.partition("=")[0]
        if not key.startswith("run."):
            continue
        inner = key[len("run.") :]
        clash = sorted(
            k for k in per_arm if k == inner or k.startswith(f"{inner}.") or inner.startswith(f"{k}.")
        )
        if clash:
            settings = "; ".join(f"{arm}: {', '.join(o)}" for arm, o in table.items())
            raise ConfigError(
                f"--set {item} would be replaced: {figure}'s arm table sets {', '.join(clash)} per arm "
                f"({settings}). {hint}"
            )
        values = {arm: _plain(OmegaConf.select(config, inner)) for arm, config in arms.items()}
        if len({repr(v) for v in values.values()}) > 1:
            listed = "; ".join(f"{arm}: {value}" for arm, value in values.items())
            raise ConfigError(
                f"--set {item} would give every arm of {figure} the same {inner}, the setting that tells "
                f"its methods apart ({listed}). {hint}"
            )


def _plain(value):
    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


# The metrics rows of each run of a figure by (arm, seed index), in drawing order: from the run
# directories (``run_metrics``; metrics.jsonl is the source of truth) or from their wandb mirror
# (experiments.plot)
RunMetrics = Mapping[tuple[str, int], list[dict[str, Any]]]


def run_metrics(
    sweep: Path, arms: list[str], seeds: list[int]
) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Every run's metrics.jsonl rows, read from the sweep directory (each run must be complete)."""
    return {(arm, seed): read_metrics(sweep / run_name(arm, seed)) for arm in arms for seed in seeds}


def frame(
    runs: RunMetrics, extra: dict[str, tuple[str, ...]] | None = None, divergence: str = "kl"
) -> pd.DataFrame:
    """Every evaluation row of every run, long format (one row per arm, seed and evaluated epoch).

    ``extra``: more columns, each read from the first of its candidate metric keys a row has (the
    same quantity is logged under the name of the tiny or the paper-scale reward). ``divergence``
    names the column of the evaluation's KL, or of the transition drift of ODE-trained arms."""
    extra = extra or {}
    rows = []
    for (arm, seed), metrics in runs.items():
        for row in metrics:
            if "eval_reward" not in row:
                continue
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "epoch": row["epoch"],
                    "wallclock_h": row["wallclock_h"],
                    "gpu_hours": row.get("gpu_hours", float("nan")),  # runs before it was logged: none
                    "nfe": row["nfe"],
                    divergence: row["eval_kl"] if "eval_kl" in row else row["eval_drift"],
                    "reward": row["eval_reward"],
                    "train_reward": row.get("reward_mean", float("nan")),
                    **{
                        column: next((row[k] for k in keys if k in row), float("nan"))
                        for column, keys in extra.items()
                    },
                }
            )
    columns = [divergence if column == "kl" else column for column in COLUMNS]
    return pd.DataFrame(rows, columns=[*columns, *extra])


def _draw(ax: plt.Axes, part: pd.DataFrame, x: str, y: str, arm: str) -> None:
    """One arm: the mean over seeds at each evaluated epoch (x and y both averaged) and the band from
    the lowest to the highest seed."""
    by_epoch = part.groupby("epoch", as_index=False)
    mean = by_epoch.mean(numeric_only=True)
    low, high = by_epoch.min(numeric_only=True), by_epoch.max(numeric_only=True)
    label = f"{arm} ({part['seed'].nunique()} seeds)"
    (line,) = ax.plot(mean[x], mean[y], marker="o", markersize=3, label=label)
    ax.fill_between(mean[x], low[y], high[y], color=line.get_color(), alpha=0.2, linewidth=0)


WALLCLOCK = "training wall-clock, hours\n(sampling + reward + updates)"
DRIFT = "transition drift to the reference\n(mean over steps of mean_d (dt (v - v_ref))^2)"
KL = "KL to the reference\n(per element, mean over the sampler's steps)"


@dataclass(frozen=True)
class Axis:
    """A panel's x-axis: the frame column it plots and how the panel says so."""

    column: str
    label: str
    title: str


# The compute axes a figure's first panel can plot (`python -m experiments.plot --x ...`): what a
# matched sweep's budget counts (rsm_core.budget.BUDGET_KINDS) and the published wall-clock.
COMPUTE_AXES = {
    "wallclock_h": Axis("wallclock_h", WALLCLOCK, "(a) reward vs wall-clock"),
    "gpu_hours": Axis(
        "gpu_hours", "GPU-hours of training\n(processes x training wall-clock)", "(a) reward vs GPU-hours"
    ),
    "nfe": Axis("nfe", "NFE\n(guided policy calls in rollouts, all processes)", "(a) reward vs NFE"),
    "epoch": Axis("epoch", "epochs", "(a) reward vs epochs"),
}

PANELS = (
    COMPUTE_AXES["wallclock_h"],
    Axis("kl", "KL to the reference\n(per element, summed over the trained steps)", "(b) reward vs KL"),
)


def plot_panels(
    data: pd.DataFrame,
    stem: Path,
    title: str,
    ylabel: str,
    y: str = "reward",
    panels: tuple[Axis, ...] = PANELS,
) -> list[Path]:
    """y against each panel's x (default: (a) training wall-clock, (b) KL), per arm with its seed band."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.6), constrained_layout=True)
    for arm, part in data.groupby("arm", sort=False):
        for ax, panel in zip(axes, panels, strict=True):
            _draw(ax, part, panel.column, y, arm)
    for ax, panel in zip(axes, panels, strict=True):
        ax.set_xlabel(panel.label)
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, title="mean; band = seed min-max", title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, data, stem)


@dataclass(frozen=True)
class PanelRow:
    """One row of a two-family figure: its arms and what its divergence axis measures."""

    name: str
    arms: list[str]
    divergence_label: str


def plot_rows(
    data: pd.DataFrame,
    stem: Path,
    title: str,
    ylabel: str,
    rows: list[PanelRow],
    compute: str = "wallclock_h",
) -> list[Path]:
    """Per row (a model family): y vs wall-clock, y vs its divergence (``kl_or_drift``); panels
    lettered (a), (b), (c), ... row by row as in the paper."""
    fig, axes = plt.subplots(
        len(rows), 2, figsize=(11, 4.2 * len(rows)), constrained_layout=True, squeeze=False
    )
    for r, row in enumerate(rows):
        for arm in row.arms:
            part = data[data["arm"] == arm]
            if part.empty:
                continue
            for ax, x in zip(axes[r], (compute, "kl_or_drift"), strict=True):
                _draw(ax, part, x, "reward", arm)
        axes[r, 0].set_xlabel(COMPUTE_AXES[compute].label)
        axes[r, 1].set_xlabel(row.divergence_label)
        for c, ax in enumerate(axes[r]):
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            kind = (
                COMPUTE_AXES[compute].title.split(" vs ")[1]
                if c == 0
                else row.divergence_label.split("\n")[0]
            )
            ax.set_title(f"({chr(97 + 2 * r + c)}) {row.name}: reward vs {kind}", fontsize=10)
        axes[r, 1].legend(fontsize=8, title="mean; band = seed min-max", title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, data, stem)


@dataclass(frozen=True)
class Figure:
    """A figure: its arms and how it is drawn. ``main`` runs and draws it; `python -m experiments.plot`
    redraws it from its run directories or their wandb mirror."""

    name: str  # configs/<name>/<scale>.yaml and the figure's files
    arms: dict[str, list[str]]  # arm name -> its settings (at least its registered method)
    title: str
    ylabel: str
    y: str = "reward"
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)  # more frame columns (see ``frame``)
    rows: list[PanelRow] | None = None  # two-family figures: one row of two panels per model family
    # the sweep directory's name before -<scale> (default: the figure's): figures whose shared arms
    # have the same settings share one, so a run both draw is trained once
    runs: str | None = None
    panels: tuple[Axis, ...] = PANELS  # one-row figures: the x of each panel

    @property
    def sweep(self) -> str:
        return self.runs or self.name

    def frame(self, runs: RunMetrics) -> pd.DataFrame:
        """The figure's long-format data (its CSV) from its runs' metrics rows."""
        return frame(runs, self.extra, divergence="kl" if self.rows is None else "kl_or_drift")

    def draw(
        self,
        data: pd.DataFrame,
        figures_dir: Path,
        scale: str,
        sweep: Path | None = None,
        compute: str | None = None,
    ) -> list[Path]:
        """PNG, PDF and CSV under ``figures_dir`` (the tiny scale's at its top, the others' in <scale>/);
        with the ``sweep`` directory also <figure>_images.png, each arm's first seed's evaluation images
        before and after training, where its runs saved them. ``compute``: a key of COMPUTE_AXES for
        the wall-clock panel's x (files then end in _<compute>); None: the figure's own."""
        name = self.name if compute is None else f"{self.name}_{compute}"
        stem = figures_dir / name if scale == "tiny" else figures_dir / scale / name
        title = f"{self.title} ({scale})"
        if self.rows is None:
            panels = self.panels
            if compute is not None:
                panels = tuple(
                    COMPUTE_AXES[compute] if p.column.startswith("wallclock") else p for p in panels
                )
            paths = plot_panels(data, stem, title, self.ylabel, self.y, panels)
        else:
            paths = plot_rows(
                data, stem, title, self.ylabel, rows=self.rows, compute=compute or "wallclock_h"
            )
        first = {
            arm: run_name(arm, int(seed))
            for arm, seed in data.groupby("arm", sort=False)["seed"].min().items()
        }
        if sweep is not None and first and all(image_grids.has_grids(sweep / run) for run in first.values()):
            paths.append(image_grids.figure_grid(sweep, first, stem.with_name(f"{stem.name}_images.png")))
        return paths


def main(argv: list[str] | None, figure: Figure, doc: str) -> None:
    """Run every arm x seed of ``figure`` at a scale (reusing complete runs) and draw it."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    configs = Path(__file__).parent / "configs" / figure.name
    parser.add_argument("--scale", default="tiny", help=f"smoke | tiny | paper | 1gpu ({configs}/*.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--name", help=f"sweep directory under --runs-dir (default: {figure.sweep}-<scale>)")
    parser.add_argument("--runs-dir", type=Path, default=Path("results/runs"))
    parser.add_argument("--figures-dir", type=Path, default=Path("results/figures"))
    parser.add_argument("--plot-only", action="store_true", help="redraw from the finished runs")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="run paper scale without a GPU, unplanned (tests)"
    )
    args = parser.parse_args(argv)

    cfg = load_config(SweepConfig, configs / f"{args.scale}.yaml", overrides=args.set)
    chosen = list(cfg.arms) or list(figure.arms)
    unknown = sorted(set(chosen) - set(figure.arms))
    if unknown:
        raise ConfigError(f"unknown arms {unknown} for {figure.name}; choose from {list(figure.arms)}")
    arms = arm_settings(cfg, figure.arms, figure.rows)
    # every run's config is resolved and checked before the first one starts
    configs_by_run = {(arm, seed): arm_config(cfg, arms[arm], seed) for arm in chosen for seed in cfg.seeds}
    OmegaConf.to_object(cfg)  # the sweep's own checks (its run section passed above)
    plain = load_config(
        SweepConfig,
        configs / f"{args.scale}.yaml",
        overrides=[o for o in args.set if not o.startswith("run.")],
    )
    check_overrides(
        args.set, arms, figure.name, {arm: arm_config(plain, arms[arm], seed=0) for arm in chosen}
    )
    if not args.plot_only and not args.allow_cpu and torch.cuda.is_available():
        from experiments.plan import check_runs  # a GPU sweep: refuse one whose memory plan cannot fit

        check_runs({run_name(arm, seed): OmegaConf.to_object(c) for (arm, seed), c in configs_by_run.items()})
    sweep = args.runs_dir / (args.name or f"{figure.sweep}-{args.scale}")
    started = time.perf_counter()
    if not args.plot_only:
        for (arm, seed), config in configs_by_run.items():
            name = run_name(arm, seed)
            path = sweep / name
            if RunRecord.is_complete(path):
                if not RunRecord.matches(path, config, run_inputs(config)):
                    raise RunExistsError(
                        f"{path} is a complete run of another config or another tiny world; "
                        "use --name for a fresh sweep, or move that directory away"
                    )
                print(f"{path} is complete; reusing it (use --name for a fresh sweep)")
                continue
            identity = run_identity(
                sections(config),
                name=f"{sweep.name}/{name}",
                group=sweep.name,
                job_type=arm,
                scale=args.scale,
                seed=seed,
            )
            run(config, sweep, name, allow_cpu=args.allow_cpu, identity=identity, handle_signals=True)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under accelerate launch the main process draws the figure
    data = figure.frame(run_metrics(sweep, chosen, list(cfg.seeds)))
    paths = figure.draw(data, args.figures_dir, args.scale, sweep)
    minutes = (time.perf_counter() - started) / 60
    print(
        f"{figure.name} done in {minutes:.1f} min: runs in {sweep}; figure "
        + ", ".join(str(p) for p in paths)
    )
