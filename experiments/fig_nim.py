"""The normalised influence metric per timestep for each method at its paper schedule (the paper's
Figure 1): (a) diffusion on SD1.5's 50-step DDPM grid, (b) flow matching on SD3.5-M's 10-step
shift-3 SDE grid (VGG-Flow: its 20-step ODE grid).

h(t) comes from each method's declared coefficients (the ones the reduction checker proves), see
``baselines.influence``. Normalisation: h / mean_t h over the method's trained steps, so methods on
grids of different lengths share an axis (the spec's h / sum_t h is in the CSV too).

`make fig-nim` -> results/figures/fig_nim.{png,pdf,csv}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

from baselines import registry
from baselines.influence import influence
from experiments.cli import run

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.plot import save_figure  # noqa: E402

# (panel, method, label): methods whose h coincides with another's appear once, under a joint label.
CURVES = (
    ("(a) diffusion, SD1.5 DDPM 50 steps", "pcpo-base", r"REINFORCE / PPO / GRPO / PCPO-base ($w_t\nu_t$)"),
    ("(a) diffusion, SD1.5 DDPM 50 steps", "pcpo-reweight", "PCPO-reweight"),
    ("(a) diffusion, SD1.5 DDPM 50 steps", "sqdf", "SQDF"),
    ("(a) diffusion, SD1.5 DDPM 50 steps", "residual-nabla-db", r"Residual $\nabla$-DB"),
    ("(b) flow matching, SD3.5-M shift 3", "grpo", r"Flow-GRPO ($w_t\nu_t$)"),
    ("(b) flow matching, SD3.5-M shift 3", "pcpo-reweight-flow", "PCPO-reweight (flow)"),
    ("(b) flow matching, SD3.5-M shift 3", "tempflow-grpo", "TempFlow-GRPO"),
    ("(b) flow matching, SD3.5-M shift 3", "grpo-guard", "GRPO-Guard"),
    ("(b) flow matching, SD3.5-M shift 3", "vgg-flow", "VGG-Flow (20-step ODE)"),
)


def influence_frame() -> pd.DataFrame:
    rows = []
    for panel, name, label in CURVES:
        method = registry.get(name)
        grid = method.grid()
        h = influence(method)
        for step, (time, value) in enumerate(zip(grid.timesteps.tolist(), h.tolist(), strict=True)):
            rows.append(
                {
                    "panel": panel,
                    "method": name,
                    "label": label,
                    "grid": grid.name,
                    "step": step,
                    "t": time,
                    "h": value,
                    "h_over_sum": value / float(h.sum()),
                    "h_over_mean": value / float(h.mean()),
                }
            )
    return pd.DataFrame(rows)


def plot_fig_nim(frame: pd.DataFrame, out_stem: Path) -> list[Path]:
    panels = list(dict.fromkeys(frame["panel"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2))
    for ax, panel in zip(axes, panels, strict=True):
        part = frame[frame["panel"] == panel]
        for label, curve in part.groupby("label", sort=False):
            ax.plot(curve["t"], curve["h_over_mean"], marker="o", markersize=3, label=label)
        ax.set_yscale("log")
        ax.invert_xaxis()  # noise on the left, data on the right
        ax.set_xlabel("timestep (DDPM index)" if "diffusion" in panel else "t (1 = noise)")
        ax.set_ylabel(r"normalised influence $h(t)/\mathrm{mean}_t\,h$")
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Normalised influence of the reward signal per timestep (from the checked reductions)")
    fig.tight_layout()
    return save_figure(fig, frame, out_stem)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results/figures/fig_nim"), help="path without suffix"
    )
    args = parser.parse_args(argv)
    paths = plot_fig_nim(influence_frame(), args.out)
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    run(main)
