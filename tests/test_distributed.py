"""Data parallelism: two synchronised CPU processes (gloo, via accelerate) end an epoch with the same
LoRA weights as one process that runs both shards with the same global batch.

`accelerate launch --cpu --num_processes 2` silently runs one process, so the launch goes through
experiments.launch (the repository's multi-GPU accelerate config, a free port) with --allow-cpu,
which sets ACCELERATE_USE_CPU; the test checks that two ranks really ran.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsm_core import checkpoints
from rsm_core.records import load_tensors, read_metrics

ROOT = Path(__file__).resolve().parents[1]
RUN = "tempflow-grpo-seed0"
SETTINGS = [
    "--scale",
    "smoke",
    "--set",
    "arms=[TempFlow-GRPO]",
    "--set",
    "run.loop.epochs=1",
    "--set",
    "run.arm.prompts_per_epoch=2",
]


def params(path: Path) -> list[torch.Tensor]:
    tensors = load_tensors(path)
    return [tensors[f"param.policy.{i}"] for i in range(sum(k.startswith("param.policy.") for k in tensors))]


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_shards(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    single, double = tmp_path / "single", tmp_path / "double"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.fig3",
            *SETTINGS,
            "--set",
            "run.shards=2",
            "--runs-dir",
            str(single),
        ],
        cwd=ROOT,
        env=subprocess_env,
        check=True,
        capture_output=True,
    )
    launch = [sys.executable, "-m", "experiments.launch", "--processes", "2", "experiments.fig3"]
    subprocess.run(
        [*launch, *SETTINGS, "--runs-dir", str(double), "--allow-cpu"],
        cwd=ROOT,
        env=subprocess_env,
        check=True,
        capture_output=True,
    )

    run_single, run_double = single / "fig3-smoke" / RUN, double / "fig3-smoke" / RUN
    assert checkpoints.latest(run_single, 1) is None
    assert checkpoints.latest(run_double, 1) is not None, "the second process did not run"
    reference = params(checkpoints.latest(run_single, 0))
    assert any(float(p.abs().max()) > 0 for p in reference), "LoRA B stayed zero: nothing was trained"
    rank0, rank1 = (params(checkpoints.latest(run_double, r)) for r in (0, 1))
    for a, b in zip(rank0, rank1, strict=True):
        assert torch.equal(a, b), "the two processes hold different weights: not synchronised"
    # Adam divides by the gradient's running RMS, so float rounding of near-zero gradients (summation
    # order of the all-reduce) can move a weight by a sliver of one step; allow 1e-3 of a step.
    lr, steps = 3e-4, 2
    for a, b in zip(reference, rank0, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-3 * lr * steps)
    # Adam is blind to the gradient's scale, so check the synchronised gradient itself through its
    # logged norm (it would double if the processes summed instead of averaging).
    single_row, double_row = (read_metrics(run)[-1] for run in (run_single, run_double))
    assert double_row["grad_norm"] == pytest.approx(single_row["grad_norm"], rel=1e-4)
    assert double_row["reward_mean"] == pytest.approx(single_row["reward_mean"], rel=1e-6)
    # each process evaluated half of the test set; gathered, it is the whole set
    assert double_row["eval_reward"] == pytest.approx(single_row["eval_reward"], rel=1e-6)
    assert double_row["eval_kl"] == pytest.approx(single_row["eval_kl"], rel=1e-4, abs=1e-12)
    assert double_row["nfe"] == single_row["nfe"] and double_row["microbatches"] == single_row["microbatches"]
