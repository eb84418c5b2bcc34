"""`make fig3`: the paper's Figure 3 — TempFlow-GRPO vs Uniform vs Equal Variance Reallocation.

Three arms of zeroth-order flow matching with branching rollouts under matched compute (the same
children per parent, sum k = 54, and the same epochs), each over several seeds, on the tiny flow
model with shapes_aesthetic by default (SCALE=tiny), or at the paper's configuration (SCALE=paper:
SD3.5-M, Pick-a-Pic prompts, 16 prompts x 4 seeds, 150 epochs, 2 GPUs with `accelerate launch`).
Panels: (a) evaluation reward against training wall-clock hours, (b) against KL to the reference;
mean and min-max band over seeds. `--plot-only` redraws from the runs' metrics.jsonl.
"""

from __future__ import annotations

from experiments import zo_sweep
from experiments.cli import run

# The arms (spec §14): the baseline as published, and the two redesigns = fair clipping plus a
# reallocated branching profile. The spec recommends the baseline's loss family (ppo) for both.
ARMS = {
    "TempFlow-GRPO": ["arm.profile=base", "arm.loss.objective=ppo", "arm.loss.reweight=tempflow"],
    "Uniform Reallocation": ["arm.profile=base2", "arm.loss.objective=ppo", "arm.loss.reweight=fair_clip"],
    "Equal Variance Reallocation": [
        "arm.profile=highsnr2",
        "arm.loss.objective=ppo",
        "arm.loss.reweight=fair_clip",
    ],
}


def main(argv: list[str] | None = None) -> None:
    zo_sweep.main(
        argv,
        figure="fig3",
        doc=__doc__,
        arms=ARMS,
        title="Figure 3 — zeroth-order flow, branching budget",
        ylabel="evaluation reward (EMA weights, ODE)",
    )


if __name__ == "__main__":
    run(main)
