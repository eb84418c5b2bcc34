"""`make fig-zo-flow`: the GenEval validation of zeroth-order flow matching (paper Fig. 16a).

The redesign — branching only at the first four low-SNR steps (profile lowsnr2), the "matching"
objective with fair clipping and GRPO-Guard's temporal weight (fair_clip2) and ODE-anchor KL rows on
the steps without branches — against the TempFlow-GRPO baseline, both in the GenEval preset
(beta 0.004, exact KL denominator), trained on the partial GenEval score. Tiny scale: the tiny flow
model with shapes_geneval; paper scale: SD3.5-M with the remote GenEval reward server.
"""

from __future__ import annotations

from experiments import sweep
from experiments.cli import run

ARMS = {
    "TempFlow-GRPO": ["method=tempflow-grpo"],
    "lowsnr2 + matching + fair clip2": ["method=lowsnr2-matching-fairclip2"],
}


FIGURE = sweep.Figure(
    name="fig_zo_flow",
    arms=ARMS,
    title="GenEval validation — zeroth-order flow",
    ylabel="GenEval strict accuracy\n(mean over test images)",
    y="strict",
    extra={"strict": ("eval_shapes_geneval_strict", "eval_geneval-server-strict")},
)


def main(argv: list[str] | None = None) -> None:
    sweep.main(argv, FIGURE, __doc__)


if __name__ == "__main__":
    run(main)
