"""Figures from logged runs: each reads a run directory's metrics.jsonl, never stdout or memory.

`python -m experiments.plot fig-toy RUN_DIR [--out STEM]` rebuilds the toy figure from a finished run.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

from experiments.cli import run

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from rsm_core.records import atomic_write_text, read_metrics  # noqa: E402

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="figure", required=True)
    toy = sub.add_parser("fig-toy", help="the toy value-gradient-estimator figure")
    toy.add_argument("run_dir", type=Path)
    toy.add_argument(
        "--out", type=Path, default=Path("results/figures/fig_toy"), help="output path without suffix"
    )
    args = parser.parse_args(argv)
    paths = plot_fig_toy(toy_frame(args.run_dir), args.out, title=args.run_dir.name)
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    run(main)
