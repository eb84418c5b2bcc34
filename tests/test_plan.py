"""The memory planner: weights from the published configs, activations measured on reduced real networks
(here at a few tokens, small sides and fp32, for speed), and the refusal of a run that cannot fit."""

from __future__ import annotations

import dataclasses

import pytest

from experiments import footprints as fp
from experiments import plan as planner
from experiments.run import ModelConfig, RunConfig
from rsm_core.config import ConfigError

GIB = 2**30
# a few tokens keep each measurement to seconds; bytes per block do not depend on the values
TOKENS = {"image_tokens": 16, "text_tokens": 8, "precision": "fp32", "dual": 0}
# a small UNet of the SD1.5 layout, a small TAESD3 and a two-layer CLIP tower: seconds each
SMALL_UNET = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
SMALL_UNET |= dict(
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, layers_per_block=1
)
SMALL_TAESD = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)
SMALL_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2)
SMALL_CLIP |= dict(patch_size=8, image_size=32, projection_dim=32)


@pytest.fixture(scope="module")
def measured() -> dict[str, fp.Activations]:
    return {
        "2-full": fp.measure_activations(2, checkpointing=False, **TOKENS),
        "3-full": fp.measure_activations(3, checkpointing=False, **TOKENS),
        "2-checkpointed": fp.measure_activations(2, checkpointing=True, **TOKENS),
    }


def settings(**arm) -> RunConfig:
    model = ModelConfig(backbone="sd35", precision="fp16", gradient_checkpointing=True)
    base = {"microbatch_rows": 108, "chunk": 12, "decode_chunk": 12, "eval_batch": 16}
    return RunConfig(method="tempflow-grpo", model=model, reward="aesthetic", arm={**base, **arm})


def fake(backbone: fp.Footprint | None = None) -> planner.Measured:
    made_up = fp.Footprint(saved=89e6, backward=90e6, inference=45e6)
    decode = fp.Footprint(saved=3 * GIB, backward=0.2 * GIB, inference=768 * 2**20)
    return planner.Measured(
        backbone or made_up, decode, fp.Footprint(0.4 * GIB, 0.01 * GIB, 0.02 * GIB), "fake"
    )


def of_depth(act: fp.Activations, layers: int = 24) -> fp.Footprint:
    """A measurement without MMDiT-X blocks, extended to ``layers`` plain blocks."""
    return fp.Footprint(act.saved_for(layers, 0), act.backward, act.inference)


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


def test_the_hps_reward_is_clip_vit_h_14_in_fp32() -> None:
    """HPSv2.1's open_clip ViT-H-14 (spec §0.3), counted from a meta-device CLIPModel of its shape."""
    assert fp.reward_parameters("hpsv2") == pytest.approx(986e6, rel=1e-3)
    hps = dataclasses.replace(settings(), reward="hpsv2")
    rows = {row.name: row.gib for row in planner.plan(hps, fake()).weights}
    assert rows["reward"] == pytest.approx(fp.reward_parameters("hpsv2") * 4 / GIB)


def test_checkpointing_shrinks_the_training_row(measured) -> None:
    full, checkpointed = measured["2-full"], measured["2-checkpointed"]
    assert checkpointed.saved_for(24, 0) < full.saved_for(24, 0) / 5
    rows = {
        name: {r.name: r.gib for r in planner.plan(settings(), fake(of_depth(act))).phases}["training"]
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


# --- first-order arms (Figures 5, 6) ----------------------------------------------------------------


@pytest.fixture
def first_order_plans(monkeypatch) -> dict[str, dict[str, tuple[RunConfig, planner.Plan]]]:
    """Every fig5/fig6 paper arm planned on the fake measurements (the real ones take minutes)."""
    monkeypatch.setattr(planner, "measure", lambda *args, **kwargs: fake())
    return {figure: planner.figure_plans(figure, "paper", []) for figure in ("fig5", "fig6")}


def test_the_plan_of_every_first_order_paper_arm_builds(first_order_plans) -> None:
    for figure, plans in first_order_plans.items():
        for arm, (settings_, plan) in plans.items():
            assert [row.name for row in plan.phases] == [
                "load",
                "collection",
                "reward",
                "training",
                "evaluation",
            ]
            assert all(row.gib > 0 for row in plan.phases), (figure, arm)
            assert plan.host is not None and plan.host.gib > 0
            rows = {row.name: row for row in plan.weights}
            assert rows["reward"].gib == pytest.approx(fp.reward_parameters("hpsv2") * 4 / GIB)
            decoder = "taesd3" if settings_.model.backbone == "sd35" else "sd15-vae"
            assert decoder in rows and rows["LoRA state"].counts.endswith("2 AdamW)")  # no EMA
            assert plan.peak == max(plan.totals.values()) and planner.table(plan, settings_.gpu_memory_gb)
        assert planner.summary(plans).count("\n") == len(plans) + 1


def test_the_estimator_decides_what_training_adds(first_order_plans) -> None:
    """The lookahead runs the denoiser with grad besides the reward's gradient; the terminal estimator
    takes its gradients at collection, where its reward phase grows instead."""
    plans = first_order_plans["fig6"]
    training = {arm: p.totals["training"] for arm, (_, p) in plans.items()}
    reward = {arm: p.totals["reward"] for arm, (_, p) in plans.items()}
    assert training["Lookahead estimator, redesign weighting"] > training["Redesign (diffusion)"]
    assert reward["Lookahead estimator, redesign weighting"] < reward["Redesign (diffusion)"]
    assert training["Linear Baseline A"] > training["Redesign (flow)"]  # the Tweedie pass


@pytest.mark.parametrize(
    ("figure", "arm"), [("fig5", "Residual nabla-DB (pruned)"), ("fig5", "VGG-Flow (pruned)")]
)
def test_bigger_microbatches_give_bigger_peaks(first_order_plans, figure: str, arm: str) -> None:
    settings_, _ = first_order_plans[figure][arm]
    peaks = []
    for rows in (1, 2, 4, 8):
        resized = dataclasses.replace(settings_, arm={**settings_.arm, "microbatch_rows": rows})
        plan = planner.plan(resized, fake())
        peaks.append((plan.totals["training"], plan.peak))
    assert all(a[0] < b[0] and a[1] <= b[1] for a, b in zip(peaks, peaks[1:], strict=False))
    assert peaks[-1][1] > peaks[0][1]


def test_reduced_networks_measure_positive_bytes_that_scale_with_pixels() -> None:
    """The measurements behind a first-order plan, on small networks of the real classes: the UNet and
    a decoder measured at two sides agree once scaled by pixels; the CLIP tower extrapolates by depth."""
    lora = (4, 4.0, ("to_q", "to_k", "to_v", "to_out.0"))
    unet = [fp.measure_unet(64, lora, "fp32", side=side, **SMALL_UNET) for side in (4, 8)]
    assert all(f.saved > 0 and f.inference > 0 for f in unet)
    assert unet[0].saved == pytest.approx(unet[1].saved, rel=0.35)
    decoder = [fp.measure_decoder("taesd3", 64, side=side, **SMALL_TAESD) for side in (4, 8)]
    assert all(f.saved > f.inference > 0 for f in decoder)  # a backward keeps more than a no-grad pass
    assert decoder[0].saved == pytest.approx(decoder[1].saved, rel=0.1)
    tower = fp.measure_clip_vision(SMALL_CLIP)
    shallow = fp.measure_clip_vision({**SMALL_CLIP, "num_hidden_layers": 2})
    assert tower.saved > shallow.saved > 0


# --- zeroth-order diffusion (PCPO, sparse branching) --------------------------------------------------


def test_both_zeroth_order_diffusion_paper_arms_plan_with_their_own_knobs(monkeypatch) -> None:
    """PCPO's trajectory arm and the redesign's branching arm are planned on SD1.5 with each kind's own
    rollout and training knobs, and an over-budget arm is refused naming its kind's setting."""
    monkeypatch.setattr(planner, "measure", lambda *args, **kwargs: fake())
    plans = planner.figure_plans("fig_zo_diffusion", "paper", [])
    assert set(plans) == {"PCPO", "Sparse branching (redesign)"}
    for arm, (settings_, plan) in plans.items():
        assert settings_.model.backbone == "sd15" and settings_.gpu_memory_gb == 24
        assert [row.name for row in plan.phases] == ["load", "rollout", "decode", "training", "evaluation"]
        assert all(row.gib > 0 for row in plan.phases), arm
    pcpo_settings, pcpo_plan = plans["PCPO"]
    assert pcpo_plan.settings["rollout"] == 8 and pcpo_plan.settings["training"] == 4  # sample / train batch
    bigger = dataclasses.replace(pcpo_settings, arm={**pcpo_settings.arm, "train_batch": 400})
    with pytest.raises(ConfigError, match=r"lower run\.arm\.train_batch \(now 400"):
        planner.check_fits(planner.plan(bigger, fake()), 24)
    _, redesign_plan = plans["Sparse branching (redesign)"]
    assert redesign_plan.settings["rollout"] == 2 and redesign_plan.settings["training"] == 4
