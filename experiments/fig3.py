"""`make fig3`: the paper's Figure 3 — TempFlow-GRPO vs Uniform vs Equal Variance Reallocation.

Three arms of zeroth-order flow matching with branching rollouts under matched compute (the same
children per parent, sum k = 54, and the same epochs), each over several seeds, on the tiny flow
model with shapes_aesthetic by default (SCALE=tiny), or at the paper's configuration (SCALE=paper:
SD3.5-M, Pick-a-Pic prompts, 16 prompts x 4 seeds, 150 epochs, 2 GPUs through experiments.launch).
Panels: (a) evaluation reward against training wall-clock hours, (b) against KL to the reference;
mean and seed spread. `--plot-only` redraws from the runs' metrics.jsonl.
"""

from __future__ import annotations

from experiments import sweep
from experiments.cli import run

# The arms (spec §14): the baseline as published and the two redesigns (fair clipping plus a
# reallocated branching profile); each is a registered method (baselines/tempflow_grpo.py).
ARMS = {
    "TempFlow-GRPO": ["method=tempflow-grpo"],
    "Uniform Reallocation": ["method=uniform-reallocation"],
    "Equal Variance Reallocation": ["method=equal-variance-reallocation"],
}


FIGURE = sweep.Figure(
    name="fig3",
    arms=ARMS,
    title="Figure 3 — zeroth-order flow, branching budget",
    ylabel="evaluation reward\n(EMA weights, ODE samples)",
)


def main(argv: list[str] | None = None) -> None:
    sweep.main(argv, FIGURE, __doc__)


if __name__ == "__main__":
    run(main)
