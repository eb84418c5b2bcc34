"""`make fig6`: the paper's Figure 6 — where the redesign's gain comes from. Flow (a, b): the
redesign against Linear Baselines A and B, which keep VGG-Flow's Tweedie estimator under the linear
schedule at the baseline's and the redesign's scale; diffusion (c, d): the redesign against the arm
that keeps nabla-DB's lookahead estimator under the redesign's weighting. Same scales and outputs
as `make fig5`.
"""

from __future__ import annotations

from experiments import sweep
from experiments.cli import run

ARMS = {
    "Redesign (flow)": ["method=reward-score-distillation-flow"],
    "Linear Baseline A": ["method=vgg-flow-linear-a"],
    "Linear Baseline B": ["method=vgg-flow-linear-b"],
    "Redesign (diffusion)": ["method=reward-score-distillation-diffusion"],
    "Lookahead estimator, redesign weighting": ["method=nabla-db-estimator-ablation"],
}
ROWS = [
    sweep.PanelRow("flow", ["Redesign (flow)", "Linear Baseline A", "Linear Baseline B"], sweep.DRIFT),
    sweep.PanelRow(
        "diffusion", ["Redesign (diffusion)", "Lookahead estimator, redesign weighting"], sweep.KL
    ),
]


FIGURE = sweep.Figure(
    name="fig6",
    arms=ARMS,
    title="Figure 6 — estimator or weighting?",
    ylabel="evaluation reward\n(policy samples, fixed test prompts)",
    rows=ROWS,
    runs=sweep.FIRST_ORDER_RUNS,
)


def main(argv: list[str] | None = None) -> None:
    sweep.main(argv, FIGURE, __doc__)


if __name__ == "__main__":
    run(main)
