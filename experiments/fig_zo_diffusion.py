"""`make fig-zo-diffusion`: the zeroth-order diffusion validation (paper Fig. 16 b, c; the README's 4 b, c).

PCPO as published (whole uw-sigma SDE trajectories, 16 per prompt, every transition but the last
trained with the clipped constant-weight surrogate) against the paper's sparse-branching redesign
(a DDIM root per parent, 4 one-step children at every 10th step, DDIM continuations, advantages per
(prompt, step), ODE anchors). Panels as published: (b) evaluation reward against wall-clock with the
evaluation epochs counted, as the SD1.5 trainers count it, and (c) against eval_approx_kl, the
published 4.5^2-weighted proxy (the exact KL of the uw-sigma kernels is logged beside it as eval_kl).

Tiny scale (default): the tiny diffusion model with the black-box shapes_hps reward, the published
recipe at reduced sizes (configs/fig_zo_diffusion/tiny.yaml names each reduction); paper scale: SD1.5,
HPSv2.1, the HPDv2 prompts, 300 epochs on 4 GPUs. `--plot-only` redraws from the runs.
"""

from __future__ import annotations

from experiments import sweep
from experiments.cli import run

ARMS = {
    "PCPO": ["method=pcpo-reweight"],
    "Sparse branching (redesign)": ["method=sparse-branching"],
}
PANELS = (
    sweep.Axis(
        "wallclock_eval_h",
        "wall-clock, hours\n(sampling + reward + updates + evaluation, as published)",
        "(b) reward vs wall-clock",
    ),
    sweep.Axis(
        "approx_kl",
        "eval_approx_kl (published proxy)\n1/2 mean over steps, dims of (4.5 (eps - eps_ref))^2",
        "(c) reward vs KL proxy",
    ),
)


FIGURE = sweep.Figure(
    name="fig_zo_diffusion",
    arms=ARMS,
    title="Zeroth-order diffusion — PCPO vs sparse branching",
    ylabel="evaluation reward\n(plain SDE sampler, fixed prompts and noise)",
    extra={"wallclock_eval_h": ("wallclock_eval_h",), "approx_kl": ("eval_approx_kl",)},
    panels=PANELS,
)


def main(argv: list[str] | None = None) -> None:
    sweep.main(argv, FIGURE, __doc__)


if __name__ == "__main__":
    run(main)
