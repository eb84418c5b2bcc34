"""`make fig5 SCALE=paper` / `make fig6 SCALE=paper`: every arm's resolved config holds the published
settings of fo_first_order spec §A (Residual nabla-DB on SD1.5) and §B (VGG-Flow on SD3.5-M).

The configs are resolved as the figures resolve them (the scale file, the family and arm overrides,
the method's registry entry; experiments.sweep), without loading weights or rewards. Every expected
value is written literally from the spec, with its section."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from experiments.embeddings import figure_runs
from experiments.run import ModelConfig, RunConfig, model_family, trainable_method
from rsm_core.arms.fo_trajectory import FOTrajectoryConfig
from rsm_core.config import ConfigError, InvalidValue

ROOT = Path(__file__).resolve().parents[1]
FLOW = {  # arm -> (method, reward scale, eta mode, estimator): spec §B.3 table and Fig. 6(a,b)
    "Redesign (flow)": ("reward-score-distillation-flow", 1.5e7, "linear", "terminal"),
    "VGG-Flow (pruned)": ("vgg-flow", 3e7, "quad", "tweedie"),
    "VGG-Flow (unpruned)": ("vgg-flow-unpruned", 3e7, "quad", "tweedie"),
    "Linear Baseline A": ("vgg-flow-linear-a", 3e7, "linear", "tweedie"),
    "Linear Baseline B": ("vgg-flow-linear-b", 1.5e7, "linear", "tweedie"),
}
DIFFUSION = {  # arm -> (method, strength, reward mode, estimator, lr, epochs): spec §A.3 table
    "Redesign (diffusion)": ("reward-score-distillation-diffusion", "sigma", "sigma", "terminal", 4e-3, 100),
    "Residual nabla-DB (pruned)": ("residual-nabla-db", 1.0, "squared", "lookahead", 1e-3, 101),
    # [?] in §A.3: the ablation keeps the redesign's lr (and its 100 epochs)
    "Lookahead estimator, redesign weighting": (
        "nabla-db-estimator-ablation",
        "sigma",
        "sigma",
        "lookahead",
        4e-3,
        100,
    ),
}
ARMS = {
    "fig5": [
        "Redesign (flow)",
        "VGG-Flow (pruned)",
        "VGG-Flow (unpruned)",
        "Redesign (diffusion)",
        "Residual nabla-DB (pruned)",
    ],
    "fig6": [
        "Redesign (flow)",
        "Linear Baseline A",
        "Linear Baseline B",
        "Redesign (diffusion)",
        "Lookahead estimator, redesign weighting",
    ],
}
CASES = [(figure, arm) for figure, arms in ARMS.items() for arm in arms]


@pytest.fixture(scope="module")
def paper() -> dict[str, dict[str, RunConfig]]:
    return {figure: figure_runs(figure, "paper", []) for figure in ARMS}


def rows_per_update(settings: RunConfig) -> int:
    arm = FOTrajectoryConfig(**settings.arm)
    return arm.trajectories_per_epoch * arm.rows_per_trajectory // settings.loop.updates_per_epoch


def check_shared(settings: RunConfig) -> None:
    """What both families share: LoRA (spec §A.4, §B.4), AdamW and clip, bf16, CFG 5, the reward and
    GenEval's prompts (spec §0.3, §0.4)."""
    model, loop = settings.model, settings.loop
    assert (model.lora_rank, model.lora_alpha, model.lora_init) == (8, 8.0, "gaussian")
    assert model.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"]  # not the add_* projections
    assert model.precision == "bf16" and model.half_frozen_weights
    assert tuple(loop.betas) == (0.9, 0.999) and loop.adam_eps == 1e-8
    assert loop.max_grad_norm == 1.0 and not loop.ema
    assert settings.arm["cfg"] == 5.0
    assert settings.reward == "hpsv2"
    assert settings.prompts.source == "files"
    assert settings.prompts.train_file == "geneval/train_metadata.jsonl"
    assert settings.prompts.test_file == "geneval/test_metadata.jsonl"
    assert settings.prompts.eval_prompts == 0 and settings.arm["eval_images_per_prompt"] == 1  # every entry
    assert settings.arm["eval_batch"] == 8
    assert not settings.arm["eval_fixed_noise"]  # fresh noise per evaluation (spec §A.5, §B.6)


@pytest.mark.parametrize(("figure", "arm"), [c for c in CASES if c[1] in FLOW])
def test_flow_arms_are_the_published_vgg_flow_runs(paper, figure: str, arm: str) -> None:
    settings = paper[figure][arm]
    method, scale, eta, estimator = FLOW[arm]
    assert settings.method == method
    check_shared(settings)
    objective, model, loop, config = settings.objective, settings.model, settings.loop, settings.arm
    # spec §B.3: reward scale and schedule, per-sample clip tau = 1, no trust-region term
    assert (objective["reward_scale"], objective["eta_mode"]) == (scale, eta)
    assert objective["clip_threshold"] == 1.0 and objective["unet_reg_scale"] == 0.0
    # spec §0.2: SD3.5-M at 1024 px, T5 at 256 tokens, every reward decoded by TAESD3
    assert (model.backbone, model.resolution, model.t5_max_length, model.decoder) == (
        "sd35",
        1024,
        256,
        "taesd3",
    )
    # spec §0.2, §B.1-B.3: 20-step Euler ODE, uncond detached in training, 8 prompts per rank
    assert (config["sampler"], config["sampler_steps"], config["cfg_grad"]) == ("ode", 20, "detach_uncond")
    assert (config["trajectories_per_epoch"], config["collection_batch"]) == (8, 8)
    assert (config["transitions"], config["estimator"]) == ("all", estimator)
    assert not config["rank_identical_seeding"]  # the choice of spec §B.1's flag: 32 distinct trajectories
    # spec §B.2: batch 4 x accumulation 2 = one update of 8 x 20 = 160 rows, forwards of 4 rows; §B.5:
    # the unpruned batch 1 x accumulation 8 (forwards of 1 row) with its value network, terminal weight
    # 1000 averaged per 1-row microbatch, finite differences at 1e-4
    assert loop.updates_per_epoch == 1 and rows_per_update(settings) == 160
    unpruned = method.endswith("-unpruned")
    assert config["microbatch_rows"] == (1 if unpruned else 4)
    assert config["auxiliary"] == ("value_adapter" if unpruned else "none")
    if unpruned:
        assert (config["aux_lora_rank"], config["aux_lora_alpha"], config["aux_head_scale"]) == (8, 8.0, 1e-5)
        assert (config["aux_max_grad_norm"], config["value_condition"]) == (1.0, "empty")
        assert config["aux_lr"] is None and config["aux_weight_decay"] is None  # the policy's AdamW
        assert (objective["coeff_terminal"], objective["terminal_group_rows"], objective["fd_eps"]) == (
            1000.0,
            1,
            1e-4,
        )
    # spec §B.4: AdamW lr 5e-4, decay 1e-2, 201 epochs; §B.6: eval every 50 epochs
    assert (loop.lr, loop.weight_decay, loop.epochs) == (5e-4, 1e-2, 201)
    assert loop.eval_every == 50
    assert settings.gpu_memory_gb == 140  # an H200


@pytest.mark.parametrize(("figure", "arm"), [c for c in CASES if c[1] in DIFFUSION])
def test_diffusion_arms_are_the_published_nabla_db_runs(paper, figure: str, arm: str) -> None:
    settings = paper[figure][arm]
    method, strength, mode, estimator, lr, epochs = DIFFUSION[arm]
    assert settings.method == method
    check_shared(settings)
    objective, model, loop, config = settings.objective, settings.model, settings.loop, settings.arm
    # spec §A.3: R = 5e5, strength and reward factor, the sigma~ off-by-one gap, trust region 100
    assert objective["reward_scale"] == 5e5
    assert (objective["pretrained_strength"], objective["reward_adaptive_mode"]) == (strength, mode)
    assert objective["sigma_gap"] == 19 and objective["unet_reg_scale"] == 1e2
    # spec §0.1: SD1.5 (eps) at 512 px
    assert (model.backbone, model.resolution) == ("sd15", 512)
    # spec §0.1, §A.1-A.2: 50-step DDIM eta = 1, gradients through both CFG halves, 64 trajectories per
    # rank in batches of 8, 11 low-variance transitions each
    assert (config["sampler"], config["sampler_steps"], config["cfg_grad"]) == ("ddpm", 50, "both")
    assert (config["trajectories_per_epoch"], config["collection_batch"]) == (64, 8)
    assert (config["transitions"], config["timestep_fraction"]) == ("low_variance", 0.2)
    assert FOTrajectoryConfig(**config).rows_per_trajectory == 11 and config["estimator"] == estimator
    # spec §A.4: 32 trajectories x 11 = 352 rows per update, 2 updates per epoch; §A.3 step 6: forward
    # and backward per transition, one row at a time
    assert loop.updates_per_epoch == 2 and rows_per_update(settings) == 352
    assert config["microbatch_rows"] == 1
    # spec §A.3 table, §A.4: lr, epochs, AdamW decay 1e-4; §A.5: the baseline's eval cadence (25)
    assert (loop.lr, loop.epochs, loop.weight_decay) == (lr, epochs, 1e-4)
    assert loop.eval_every == 25
    assert settings.gpu_memory_gb == 24  # an RTX 4090


def test_the_arms_both_figures_share_resolve_alike(paper) -> None:
    """fig6/paper.yaml repeats fig5's run and family settings: the redesigns they share must agree."""
    for arm in ("Redesign (flow)", "Redesign (diffusion)"):
        assert dataclasses.asdict(paper["fig5"][arm]) == dataclasses.asdict(paper["fig6"][arm])


@pytest.mark.parametrize("figure", ARMS)
def test_make_launches_the_paper_figures_on_four_processes(figure: str) -> None:
    done = subprocess.run(
        ["make", "-n", figure, "SCALE=paper", "PY=python"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"python -m experiments.launch --processes 4 experiments.{figure} --scale paper" in done.stdout


def test_each_family_trains_its_own_paper_backbone() -> None:
    """model_family: SD1.5 for the eps-prediction (nabla-DB) methods, SD3.5-M for the flow ones."""
    nabla, vgg = trainable_method("residual-nabla-db"), trainable_method("vgg-flow")
    assert model_family(nabla, "sd15", "model.backbone") == "sd15"
    assert model_family(vgg, "sd35", "model.backbone") == "sd35"
    with pytest.raises(
        InvalidValue, match=r"eps-prediction model; choose one of \['tiny-diffusion', 'sd15'\]"
    ):
        model_family(nabla, "sd35", "model.backbone")
    with pytest.raises(InvalidValue, match=r"v-prediction model; choose one of \['tiny-flow', 'sd35'\]"):
        model_family(vgg, "sd15", "model.backbone")


def test_taesd3_is_a_decoder_of_sd35_only() -> None:
    with pytest.raises(ConfigError, match="decoder"):
        ModelConfig(backbone="sd15", decoder="taesd3")
    assert ModelConfig(backbone="sd35", decoder="taesd3").decoder == "taesd3"
