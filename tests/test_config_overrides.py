"""Every override takes effect or fails with one line naming the key — tried the way a new user would,
on `make fig3 SCALE=smoke` — and nothing is written when it fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from experiments import fig3, fig_zo_flow
from experiments.run import RunConfig, resolve
from experiments.sweep import SweepConfig, arm_config
from rsm_core.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "configs" / "fig3" / "smoke.yaml"


def fig3_smoke(tmp_path: Path, *overrides: str) -> None:
    args = ["--scale", "smoke", "--runs-dir", str(tmp_path / "runs"), "--figures-dir", str(tmp_path / "fig")]
    fig3.main([*args, *(item for o in overrides for item in ("--set", o))])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.loop.epochs=-1", r"'run\.loop\.epochs'.*at least 1"),
        ("run.loop.epochs=0", r"'run\.loop\.epochs'.*at least 1"),
        ("run.arm.profile=nope", r"'run\.arm\.profile'.*unknown branching profile 'nope'"),
        ("run.arm.bogus=1", r"run\.arm.*bogus"),
        ("run.objective.clip_range=-1", r"'run\.objective\.clip_range'.*positive"),
        ("run.objective.objective=ppo2", r"'run\.objective\.objective'"),
        ("run.model.lora_rank=0", r"'run\.model\.lora_rank'"),
        ("arms.0.profile=nope", r"'arms' is an empty list, or set the whole list with arms=\[\.\.\.\]"),
        ("seeds.0.profile=nope", r"'seeds\.0' is the value 0, not a section"),
        ("seeds.3=1", r"'seeds' is a list of 1 entries"),
        ("run.method=grpo", r"fig3's arm table sets method per arm"),
        ("run.arm.profile=base2", r"every arm of fig3 the same arm\.profile.*TempFlow-GRPO: base;"),
        ("run.objective.reweight=base", r"the same objective\.reweight.*TempFlow-GRPO: tempflow;"),
        ("run.lop.epochs=2", r"unknown config key 'run\.lop'"),
    ],
)
def test_a_bad_override_fails_before_anything_runs(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fig3_smoke(tmp_path, override)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "fig").exists()


def test_a_bad_override_is_one_line_on_the_command_line(tmp_path: Path, subprocess_env) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "experiments.fig3", "--scale", "smoke", "--runs-dir", str(tmp_path), "--set",
         "run.loop.epochs=-1"],
        cwd=ROOT, env=subprocess_env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: bad value for config key 'run.loop.epochs': "
        "must be at least 1 (a run trains at least one epoch)"
    ]


def test_overrides_take_effect_in_every_arm() -> None:
    cfg = load_config(SweepConfig, SMOKE, overrides=["run.arm.cfg=3.0", "seeds=[0,1]", "seeds.1=5"])
    assert list(cfg.seeds) == [0, 5]
    for overrides in fig3.ARMS.values():
        resolved = arm_config(cfg, overrides, seed=1)
        assert resolved.arm.cfg == 3.0
        assert resolved.seed == 42 + 1000
    # without it, each arm runs its method's own profile and loss
    cfg = load_config(SweepConfig, SMOKE)
    profiles = {arm: arm_config(cfg, o, 0).arm.profile for arm, o in fig3.ARMS.items()}
    assert profiles == {
        "TempFlow-GRPO": "base",
        "Uniform Reallocation": "base2",
        "Equal Variance Reallocation": "highsnr2",
    }
    redesign = arm_config(cfg, fig_zo_flow.ARMS["lowsnr2 + matching + fair clip2"], 0)
    assert redesign.arm.ode_anchors and redesign.objective.reweight == "fair_clip2"


def test_resolving_fills_every_value_and_is_idempotent() -> None:
    resolved = resolve(load_config(RunConfig, overrides=["method=equal-variance-reallocation"]))
    assert resolved.arm.sampler_steps == 10 and resolved.objective.clip_range == 1e-4
    assert resolve(resolved) == resolved
