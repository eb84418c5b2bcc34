"""Every registered method that can train is trained for one smoke epoch on the tiny world, the way
CleanRL smoke-runs each of its scripts: through the one entry point `python -m experiments.run`."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from baselines import registry
from experiments import run as run_module
from rsm_core import checkpoints
from rsm_core.config import ConfigError, load_config
from rsm_core.records import load_tensors, read_metrics

TRAINABLE = registry.trainable()
# what each arm kind logs besides the reward, the gradient norm and the evaluation reward
LOGGED = {
    "zo_branch": ("policy_loss", "clipfrac", "approx_kl", "eval_kl"),
    "fo_trajectory": ("loss",),
    "zo_trajectory": ("policy_loss", "clipfrac", "approx_kl", "eval_kl", "eval_approx_kl"),
}


def test_the_registry_has_trainable_baselines_and_redesigns() -> None:
    families = {m.family.value for m in TRAINABLE}
    assert families == {"baseline", "redesign"}
    for method in TRAINABLE:
        objective = method.objective()
        assert objective.name == method.name and set(objective.needs) <= set(
            run_module.arms.kind(method.arm).arm.PROVIDES
        )


@pytest.mark.parametrize("method", TRAINABLE, ids=[m.name for m in TRAINABLE])
def test_every_trainable_method_trains_one_smoke_epoch(method, tmp_path: Path) -> None:
    run_module.main([method.name, "--scale", "smoke", "--runs-dir", str(tmp_path)])
    (run_dir,) = tmp_path.iterdir()
    rows = read_metrics(run_dir)
    assert [row["epoch"] for row in rows] == [0, 1]
    trained = rows[1]
    divergence = "eval_drift" if method.arm_config.get("sampler") == "ode" else "eval_kl"  # ODE: no KL
    logged = LOGGED[method.arm]
    if method.arm_config.get("estimator", "none") != "none":  # a reward gradient in the rows
        logged += ("reward_grad_norm",)
    if method.arm_config.get("auxiliary", "none") != "none":  # the unpruned algorithms' network
        aux_group = {"value_adapter": "value", "residual_unet": "residual"}[method.arm_config["auxiliary"]]
        logged += ("aux_norm", "aux_signal_norm", f"grad_norm_{aux_group}")
    for key in ("reward_mean", "grad_norm", "eval_reward", divergence, *logged):
        assert torch.isfinite(torch.tensor(trained[key])), key
    assert trained["nfe"] > 0 and trained["reward_calls"] > 0
    assert trained["skipped_updates"] == 0
    if method.arm != "fo_trajectory":  # the importance ratio of the first, on-policy microbatch is 1
        assert trained["first_ratio_deviation"] <= run_module.LoopConfig().ratio_tolerance
    assert (run_dir / "eval_grid_start.png").is_file() and (run_dir / "eval_grid_end.png").is_file()
    settings = run_module.sections(OmegaConf.load(run_dir / "config.yaml")).run
    initial = run_module.build_backbone(settings.model, settings.seed).adapter_parameters()
    weights = load_tensors(checkpoints.latest(run_dir))
    trained_weights = [weights[f"param.policy.{i}"] for i in range(len(initial))]
    assert any(not torch.equal(a, b) for a, b in zip(initial, trained_weights, strict=True)), (
        "nothing trained"
    )
    exported = load_tensors(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    final = load_tensors(run_dir / "weights.safetensors")  # the EMA, as evaluated
    assert len(exported) == len(initial)
    assert sorted(v.sum().item() for v in exported.values()) == sorted(
        final[f"policy.{i}"].sum().item() for i in range(len(initial))
    )
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.method == method.name
    sizes = OmegaConf.merge(*map(OmegaConf.load, run_module.scale_files(method, "smoke"))).get("arm", {})
    for key, value in method.arm_config.items():  # the method's own settings reached its arm
        assert config.arm[key] == sizes.get(key, value), key
    assert config.objective == OmegaConf.structured(method.config)  # its published loss settings


def test_an_untrainable_or_unknown_method_is_refused_with_the_choices() -> None:
    for name in ("grpo", "bogus"):
        cfg = load_config(run_module.RunConfig, overrides=[f"method={name}"])
        with pytest.raises(ConfigError, match="not a trainable registered method; choose one of"):
            run_module.resolve(cfg)


def test_a_finished_run_frees_its_backbone_before_the_next_run(tmp_path: Path, monkeypatch) -> None:
    """A sweep runs its arms one after another in one process: the backbone (a 30 GiB pipeline at
    paper scale) is caught in reference cycles, so run() collects them when it returns."""
    built, build_parts = [], run_module.build_parts

    def spying(config, device="cpu"):
        parts = build_parts(config, device)
        built.append(weakref.ref(parts.backbone))
        return parts

    monkeypatch.setattr(run_module, "build_parts", spying)
    gc.collect()
    gc.disable()  # only run() may collect: the cycles must not be freed by chance
    try:
        run_module.main(["tempflow-grpo", "--scale", "smoke", "--runs-dir", str(tmp_path)])
        assert built and built[0]() is None, "the run's backbone outlived the run"
    finally:
        gc.enable()
