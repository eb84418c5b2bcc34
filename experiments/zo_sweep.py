"""Arms x seeds of zeroth-order flow runs under matched compute, and their reward curves.

`make fig3` and `make fig-zo-flow` are each a table of arms (config overrides) on top of a scale file;
this module runs the table (reusing finished runs, resuming unfinished ones), collects the evaluation
rows of every run in long format and draws reward against wall-clock and against KL, mean and
min-max band over seeds.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from experiments.zo_flow import ZOFlowRunConfig, run_inputs, run_zo_flow
from rsm_core.config import ConfigError, load_config
from rsm_core.records import RunExistsError, RunRecord, read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.plot import save_figure  # noqa: E402

COLUMNS = ["arm", "seed", "epoch", "wallclock_h", "nfe", "kl", "reward", "train_reward"]


@dataclass
class SweepConfig:
    run: ZOFlowRunConfig = field(default_factory=ZOFlowRunConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    arms: list[str] = field(default_factory=list)  # empty: every arm of the figure


def run_name(arm: str, seed: int) -> str:
    return f"{arm.lower().replace(' ', '-')}-seed{seed}"


def arm_config(cfg: SweepConfig, overrides: list[str], seed: int) -> DictConfig:
    """One run's config: the scale's run settings, then the arm's own settings and its seed."""
    seeded = [*overrides, f"arm.seed={cfg.run.arm.seed + 1000 * seed}"]
    merged = OmegaConf.merge(OmegaConf.structured(ZOFlowRunConfig), cfg.run, OmegaConf.from_dotlist(seeded))
    OmegaConf.set_readonly(merged, True)
    return merged


def frame(
    sweep: Path, arms: list[str], seeds: list[int], extra: dict[str, tuple[str, ...]] | None = None
) -> pd.DataFrame:
    """Every evaluation row of every run, long format (one row per arm, seed and evaluated epoch).

    ``extra``: more columns, each read from the first of its candidate metric keys a row has (the
    same quantity is logged under the name of the tiny or the paper-scale reward)."""
    extra = extra or {}
    rows = []
    for arm in arms:
        for seed in seeds:
            for row in read_metrics(sweep / run_name(arm, seed)):
                if "eval_reward" not in row:
                    continue
                rows.append(
                    {
                        "arm": arm,
                        "seed": seed,
                        "epoch": row["epoch"],
                        "wallclock_h": row["wallclock_h"],
                        "nfe": row["nfe"],
                        "kl": row["eval_kl"],
                        "reward": row["eval_reward"],
                        "train_reward": row.get("reward_mean", float("nan")),
                        **{
                            column: next((row[k] for k in keys if k in row), float("nan"))
                            for column, keys in extra.items()
                        },
                    }
                )
    return pd.DataFrame(rows, columns=[*COLUMNS, *extra])


def plot_panels(data: pd.DataFrame, stem: Path, title: str, ylabel: str, y: str = "reward") -> list[Path]:
    """(a) y vs training wall-clock, (b) y vs KL; mean over seeds per epoch with the min-max band."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, part in data.groupby("arm", sort=False):
        by_epoch = part.groupby("epoch")
        mean = by_epoch.mean(numeric_only=True)
        low, high = by_epoch.min(numeric_only=True), by_epoch.max(numeric_only=True)
        for ax, x in zip(axes, ("wallclock_h", "kl"), strict=True):
            (line,) = ax.plot(mean[x], mean[y], marker="o", markersize=3, label=arm)
            ax.fill_between(mean[x], low[y], high[y], color=line.get_color(), alpha=0.2)
    axes[0].set_xlabel("training wall-clock (hours: sampling + reward + updates)")
    axes[1].set_xlabel("KL to the reference (per element, summed over the trained steps)")
    for ax in axes:
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title("(a) reward vs wall-clock")
    axes[1].set_title("(b) reward vs KL")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, data, stem)


def main(
    argv: list[str] | None,
    *,
    figure: str,
    doc: str,
    arms: dict[str, list[str]],
    title: str,
    ylabel: str,
    y: str = "reward",
    extra: dict[str, tuple[str, ...]] | None = None,
) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    configs = Path(__file__).parent / "configs" / figure
    parser.add_argument("--scale", default="tiny", help=f"smoke | tiny | paper | 1gpu ({configs}/*.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--name", help=f"sweep directory under --runs-dir (default: {figure}-<scale>)")
    parser.add_argument("--runs-dir", type=Path, default=Path("results/runs"))
    parser.add_argument("--figures-dir", type=Path, default=Path("results/figures"))
    parser.add_argument("--plot-only", action="store_true", help="redraw from the finished runs")
    args = parser.parse_args(argv)

    cfg = load_config(SweepConfig, configs / f"{args.scale}.yaml", overrides=args.set)
    chosen = list(cfg.arms) or list(arms)
    unknown = sorted(set(chosen) - set(arms))
    if unknown:
        raise ConfigError(f"unknown arms {unknown} for {figure}; choose from {list(arms)}")
    sweep = args.runs_dir / (args.name or f"{figure}-{args.scale}")
    started = time.perf_counter()
    if not args.plot_only:
        for arm in chosen:
            for seed in cfg.seeds:
                config, name = arm_config(cfg, arms[arm], seed), run_name(arm, seed)
                path = sweep / name
                if RunRecord.is_complete(path):
                    if not RunRecord.matches(path, config, run_inputs(config)):
                        raise RunExistsError(
                            f"{path} is a complete run of another config or another tiny world; "
                            "use --name for a fresh sweep, or move that directory away"
                        )
                    print(f"{path} is complete; reusing it (use --name for a fresh sweep)")
                    continue
                run_zo_flow(config, sweep, name)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under accelerate launch the main process draws the figure
    data = frame(sweep, chosen, list(cfg.seeds), extra)
    stem = args.figures_dir / figure if args.scale == "tiny" else args.figures_dir / args.scale / figure
    paths = plot_panels(data, stem, f"{title} ({args.scale})", ylabel, y)
    minutes = (time.perf_counter() - started) / 60
    print(f"{figure} done in {minutes:.1f} min: runs in {sweep}; figure " + ", ".join(str(p) for p in paths))
