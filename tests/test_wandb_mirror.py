"""The wandb mirror of a run: its place in the sweep (group, job type, tags, name), ``epoch`` as the
x-axis of every key, and the same wandb run continued when the run resumes — checked against a fake
``wandb`` module that records what it is given."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.run import RunConfig, run_identity, sections
from rsm_core.records import RunRecord, WandbIdentity


class FakeRun:
    def __init__(self, calls: list, **settings) -> None:
        self.settings, self.calls = settings, calls

    def define_metric(self, name: str, **options) -> None:
        self.calls.append(("define_metric", name, options))

    def log(self, row: dict) -> None:
        self.calls.append(("log", row))

    def finish(self) -> None:
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls: list = []
    module = types.ModuleType("wandb")
    module.init = lambda **settings: calls.append(("init", settings)) or FakeRun(calls, **settings)
    module.Settings = lambda **options: options
    module.Image = lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("WANDB_ENTITY", "my-lab")
    return calls


IDENTITY = WandbIdentity(group="all_baselines-smoke", job_type="tempflow-grpo", tags=("seed:0",), name="s/r")


def test_a_run_is_placed_in_its_sweep_and_plots_against_the_epoch(tmp_path: Path, fake_wandb: list) -> None:
    record = RunRecord.create(tmp_path, "run", {"a": 1}, wandb=True, identity=IDENTITY)
    (_, settings), *defined = fake_wandb
    assert len(settings["id"]) == 8 and settings["resume"] == "allow"
    assert (settings["entity"], settings["project"]) == ("my-lab", "rsm-bench")
    assert (settings["group"], settings["job_type"], settings["tags"], settings["name"]) == (
        "all_baselines-smoke",
        "tempflow-grpo",
        ["seed:0"],
        "s/r",
    )
    assert settings["config"] == {"a": 1} and settings["mode"] == "offline"
    assert defined == [("define_metric", "epoch", {}), ("define_metric", "*", {"step_metric": "epoch"})]
    record.log({"epoch": 3, "eval_reward": 0.5, "note": "text"})
    assert fake_wandb[-1] == ("log", {"epoch": 3, "eval_reward": 0.5})  # numbers only
    record.log_image("eval_grid_end", tmp_path / "grid.png", epoch=3)
    assert fake_wandb[-1] == ("log", {"eval_grid_end": ("image", str(tmp_path / "grid.png")), "epoch": 3})
    saved = json.loads((tmp_path / "run" / "wandb.json").read_text())
    assert saved["id"] == settings["id"] and saved["group"] == "all_baselines-smoke"


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path: Path, fake_wandb: list) -> None:
    RunRecord.create(tmp_path, "run", {"a": 1}, wandb=True, identity=IDENTITY)
    first = fake_wandb[0][1]["id"]
    fake_wandb.clear()
    other = WandbIdentity(group="another-sweep")  # the first identity is kept with the id
    RunRecord.create_or_resume(tmp_path, "run", {"a": 1}, wandb=True, identity=other)
    settings = fake_wandb[0][1]
    assert settings["id"] == first and settings["group"] == "all_baselines-smoke"


def test_the_tags_name_the_method_its_family_backbone_reward_scale_and_seed() -> None:
    for method, expected in (
        ("tempflow-grpo", {"family:zeroth-order", "model:flow", "kind:baseline", "backbone:tiny-flow"}),
        ("reward-score-distillation-diffusion", {"family:first-order", "model:diffusion", "kind:redesign"}),
    ):
        resolved = sections(OmegaConf.merge(OmegaConf.structured(RunConfig), {"method": method}))
        identity = run_identity(resolved, name="n", group="g", job_type=None, scale="smoke", seed=2)
        assert expected <= set(identity.tags)
        assert {f"method:{method}", "scale:smoke", "seed:2", "reward:shapes_aesthetic"} <= set(identity.tags)
        assert identity.job_type == method and identity.group == "g"
