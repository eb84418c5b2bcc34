"""`make fig-zo-diffusion`: its arms are the registered PCPO and sparse-branching methods with the tiny
reductions its config names, and (slow) the figure runs end to end at smoke size."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from experiments import fig_zo_diffusion
from experiments.sweep import SweepConfig, arm_config, arm_settings
from rsm_core import grids
from rsm_core.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "fig_zo_diffusion"


def arms(scale: str) -> dict[str, object]:
    cfg = load_config(SweepConfig, CONFIGS / f"{scale}.yaml")
    return {
        arm: arm_config(cfg, overrides, seed=0)
        for arm, overrides in arm_settings(cfg, fig_zo_diffusion.ARMS).items()
    }


@pytest.mark.parametrize("scale", ["smoke", "tiny"])
def test_the_reduced_scales_keep_the_published_ratios(scale: str) -> None:
    """Both arms sample and evaluate on the same grid, see the same prompts per epoch, and take the
    loss weight S recomputed for that grid (spec §8); the redesign keeps K = 4, stride 10, anchor
    ratio 0.1; both keep 2 updates per epoch and the published learning rate ratio (one lr)."""
    pcpo, redesign = (arms(scale)[name] for name in fig_zo_diffusion.ARMS)
    assert pcpo.method == "pcpo-reweight" and redesign.method == "sparse-branching"
    steps = pcpo.arm.sampler_steps
    assert redesign.arm.sampler_steps == steps == pcpo.arm.eval_steps == redesign.arm.eval_steps
    assert pcpo.arm.trained_steps == steps - 1  # the last transition dropped, as published
    for config in (pcpo, redesign):
        scale = grids.pcpo_weight_scale(steps)
        assert config.objective.weight_scale_factor == pytest.approx(scale, rel=1e-12)
        assert config.loop.updates_per_epoch == 2 and not config.loop.ema
        assert config.model.backbone == "tiny-diffusion" and config.reward == "shapes_hps"
    assert pcpo.arm.prompts_per_epoch == redesign.arm.prompts_per_epoch
    assert (redesign.arm.sparse_k, redesign.arm.sparse_stride, redesign.arm.anchor_ratio) == (4, 10, 0.1)
    assert pcpo.loop.lr == redesign.loop.lr and pcpo.model == redesign.model


@pytest.mark.slow
def test_the_figure_runs_at_smoke_size(tmp_path: Path) -> None:
    args = ["--scale", "smoke", "--runs-dir", str(tmp_path / "runs"), "--figures-dir", str(tmp_path / "fig")]
    fig_zo_diffusion.main(args)
    data = pd.read_csv(tmp_path / "fig" / "smoke" / "fig_zo_diffusion.csv")
    assert {"arm", "seed", "epoch", "wallclock_eval_h", "approx_kl", "kl", "reward"} <= set(data.columns)
    assert set(data["arm"]) == set(fig_zo_diffusion.ARMS) and sorted(data["epoch"].unique()) == [0, 1]
    trained = data[data["epoch"] > 0]
    assert (trained["wallclock_eval_h"] > trained["wallclock_h"]).all()  # evaluation counted
    assert (tmp_path / "fig" / "smoke" / "fig_zo_diffusion.png").stat().st_size > 0
