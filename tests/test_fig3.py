"""`make fig3` / `make fig-zo-flow` end to end at smoke size, and their user errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments import bench, fig3, fig_zo_flow
from experiments.run import run
from experiments.sweep import SweepConfig, arm_config
from rsm_core.config import ConfigError, load_config
from rsm_core.records import AssetError, RunExistsError


def smoke(main, tmp_path: Path, *extra: str) -> None:
    main(
        [
            "--scale",
            "smoke",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--figures-dir",
            str(tmp_path / "fig"),
            *extra,
        ]
    )


def test_fig3_smoke_writes_the_figure_and_long_csv(smoke_figures: Path, tmp_path: Path) -> None:
    data = pd.read_csv(smoke_figures / "figures" / "smoke" / "fig3.csv")
    assert {"arm", "seed", "epoch", "wallclock_h", "nfe", "kl", "reward"} <= set(data.columns)
    assert set(data["arm"]) == set(fig3.ARMS)
    assert sorted(data["epoch"].unique()) == [0, 1, 2]
    assert (smoke_figures / "figures" / "smoke" / "fig3.png").stat().st_size > 0
    last = data[data["epoch"] == 2].set_index("arm")
    # matched rows per parent (sum k = 54) but not matched NFE: highsnr2's children start later
    assert last.loc["Equal Variance Reallocation", "nfe"] < last.loc["TempFlow-GRPO", "nfe"]
    # rerunning reuses the finished runs instead of overwriting them
    shutil.copytree(smoke_figures / "runs" / "fig3-smoke", tmp_path / "runs" / "fig3-smoke")
    smoke(fig3.main, tmp_path, "--set", "arms=[TempFlow-GRPO]")
    # ... but never a finished run of another tiny world (or config): that would mix results
    inputs = tmp_path / "runs" / "fig3-smoke" / "tempflow-grpo-seed0" / "inputs.json"
    assert set(json.loads(inputs.read_text())["tiny_world"]) == {"aesthetic", "clip", "diffusion", "flow"}
    inputs.write_text(json.dumps({"tiny_world": {"flow": "a retrained world"}}))
    with pytest.raises(RunExistsError, match="another tiny world"):
        smoke(fig3.main, tmp_path, "--set", "arms=[TempFlow-GRPO]")
    # a finished run is never touched, whatever its config
    cfg = load_config(SweepConfig, Path(fig3.__file__).parent / "configs" / "fig3" / "smoke.yaml")
    other = arm_config(cfg, [*fig3.ARMS["TempFlow-GRPO"], "arm.cfg=3.0"], seed=0)
    with pytest.raises(RunExistsError, match="already complete"):
        run(other, tmp_path / "runs" / "fig3-smoke", "tempflow-grpo-seed0", progress=False)


def test_fig_zo_flow_smoke_logs_strict_geneval(smoke_figures: Path) -> None:
    data = pd.read_csv(smoke_figures / "figures" / "smoke" / "fig_zo_flow.csv")
    assert set(data["arm"]) == set(fig_zo_flow.ARMS)
    assert data["strict"].notna().all() and data["reward"].between(0, 1).all()


def test_unknown_arm_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown arms"):
        smoke(fig3.main, tmp_path, "--set", "arms=[Bogus]")


def test_paper_scale_without_weights_names_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paper = ["--scale", "paper", "--runs-dir", str(tmp_path / "runs"), "--figures-dir", str(tmp_path)]
    with pytest.raises(AssetError, match="stable-diffusion-3.5-medium"):
        fig3.main([*paper, "--allow-cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_paper_scale_without_a_gpu_stops_before_creating_a_run(tmp_path: Path) -> None:
    paper = ["--scale", "paper", "--runs-dir", str(tmp_path / "runs"), "--figures-dir", str(tmp_path)]
    with pytest.raises(ConfigError, match=r"model\.backbone=sd35 is paper scale .* --allow-cpu"):
        fig3.main(paper)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # a minute of benchmark epochs; `make test-slow`
def test_bench_measures_the_minimum_nfe(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    bench.main(["--scale", "smoke", "--epochs", "1", "--out", str(out)])
    results = json.loads(out.with_suffix(".json").read_text())
    assert set(results) == set(fig3.ARMS)
    for row in results.values():
        assert row["nfe_per_parent"] == row["nfe_minimum"] < row["nfe_published"]
    assert "NFE/parent" in out.with_suffix(".md").read_text()
