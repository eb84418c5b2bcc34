"""The memory planner: weights from the published configs, activations measured on reduced-depth real
SD3.5-M copies (here at a few tokens and fp32, for speed), and the refusal of a run that cannot fit."""

from __future__ import annotations

import dataclasses

import pytest

from experiments import plan as planner
from experiments.run import ModelConfig, RunConfig
from rsm_core.config import ConfigError

GIB = 2**30
# a few tokens keep each measurement to seconds; bytes per block do not depend on the values
TOKENS = {"image_tokens": 16, "text_tokens": 8, "precision": "fp32", "dual": 0}


@pytest.fixture(scope="module")
def measured() -> dict[str, planner.Activations]:
    return {
        "2-full": planner.measure_activations(2, checkpointing=False, **TOKENS),
        "3-full": planner.measure_activations(3, checkpointing=False, **TOKENS),
        "2-checkpointed": planner.measure_activations(2, checkpointing=True, **TOKENS),
    }


def settings(**arm) -> RunConfig:
    model = ModelConfig(backbone="sd35", precision="fp16", gradient_checkpointing=True)
    base = {"microbatch_rows": 108, "chunk": 12, "decode_chunk": 12, "eval_batch": 16}
    return RunConfig(model=model, reward="aesthetic", arm={**base, **arm})


def fake(activations: planner.Activations | None = None) -> planner.Measured:
    made_up = planner.Activations(
        saved={"rest": 1e6, "dual": 4e6, "plain": 4e6, "last": 4e6},
        backward=90e6,
        inference=45e6,
        layers=3,
        seconds=0.0,
    )
    return planner.Measured(activations or made_up, decode_per_image=768 * 2**20)


def test_weights_rows_are_the_published_counts() -> None:
    rows = {row.name: row.gib for row in planner.plan(settings(), fake()).weights}
    assert rows["frozen transformer"] == pytest.approx(2_243_171_520 * 2 / GIB)
    assert rows["LoRA state"] == pytest.approx(18_776_064 * 20 / GIB)
    fp32 = dataclasses.replace(settings(), model=ModelConfig(backbone="sd35", precision="fp32"))
    assert planner.plan(fp32, fake()).weights[0].gib == pytest.approx(2_243_171_520 * 4 / GIB)
    published = dataclasses.replace(
        settings(), model=ModelConfig(backbone="sd35", precision="fp16", half_frozen_weights=False)
    )
    assert planner.plan(published, fake()).weights[0].gib == pytest.approx(2_243_171_520 * 4 / GIB)
    geneval = dataclasses.replace(settings(), reward="geneval-server")
    assert {row.name: row.gib for row in planner.plan(geneval, fake()).weights}["reward"] == 0


def test_checkpointing_shrinks_the_training_row(measured) -> None:
    full, checkpointed = measured["2-full"], measured["2-checkpointed"]
    assert checkpointed.saved_for(24, 0) < full.saved_for(24, 0) / 5
    rows = {
        name: {r.name: r.gib for r in planner.plan(settings(), fake(act)).phases}["training"]
        for name, act in (("full", full), ("checkpointed", checkpointed))
    }
    assert rows["checkpointed"] < rows["full"]


def test_doubling_the_microbatch_doubles_the_training_transient() -> None:
    def training(rows: int) -> float:
        phases = planner.plan(settings(microbatch_rows=rows), fake()).phases
        return {r.name: r.gib for r in phases}["training"]

    assert training(72) / training(36) == pytest.approx(2.0, rel=0.05)


def test_per_block_bytes_predict_a_deeper_model(measured) -> None:
    """The calibration against measured CPU runs: the 2-block measurement's per-block saved bytes
    predict the 3-block copy's directly measured total."""
    predicted = measured["2-full"].saved_for(3, 0)
    direct = sum(
        measured["3-full"].saved[kind] * count for kind, count in (("rest", 1), ("plain", 2), ("last", 1))
    )
    assert predicted == pytest.approx(direct, rel=0.3)
    assert measured["2-full"].inference > 0 and measured["2-checkpointed"].backward > 0


def test_a_plan_over_the_budget_is_refused_naming_the_knob() -> None:
    big = planner.plan(settings(), fake())
    planner.check_fits(big, 80)
    with pytest.raises(ConfigError, match=r"training phase.*run\.arm\.microbatch_rows \(now 108;"):
        planner.check_fits(big, 24)
    decode_bound = planner.plan(settings(microbatch_rows=1, decode_chunk=48), fake())
    with pytest.raises(ConfigError, match=r"run\.arm\.decode_chunk"):
        planner.check_fits(decode_bound, 24)


def test_a_scale_without_a_config_says_so() -> None:
    with pytest.raises(ConfigError, match=r"fig_zo_flow has no 1gpu config"):
        planner.figure_plans("fig_zo_flow", "1gpu", [])
