"""The paper path end to end on tiny random instances of the real classes: `fig-zo-flow --scale paper`
with the SD3.5 pipeline at the paper's 512 px, the GenEval reward through its HTTP server (a fake one
on loopback), prompt files in GenEval's metadata format, bf16 autocast with fp32 LoRA and gradient
checkpointing, prompt embeddings precomputed and the text encoders freed, the LoRA exported. Only the
sizes shrink (one epoch of two parents of one prompt), and it runs on the CPU with --allow-cpu."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_geneval_server import FakeGenEvalServer
from tiny_pipelines import T5_LENGTH, save_sd3

from experiments import fig_zo_flow
from rsm_core import checkpoints
from rsm_core.records import load_tensors, read_metrics

ROOT = Path(__file__).resolve().parents[1]
RUN = "tempflow-grpo-seed0"
PROMPTS = [
    ("single_object", "a photo of a cat", [{"class": "cat", "count": 1}]),
    (
        "two_object",
        "a photo of a cat and a dog",
        [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
    ),
    ("counting", "a photo of two dogs", [{"class": "dog", "count": 2}]),
]


def metadata_file(path: Path, rows: list[tuple[str, str, list[dict]]]) -> Path:
    lines = [json.dumps({"tag": tag, "prompt": prompt, "include": include}) for tag, prompt, include in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def paper_arguments(tmp_path: Path, url: str) -> list[str]:
    pipeline = tmp_path / "sd35"
    save_sd3(pipeline, resolution=512)
    settings = {
        "arms": "[TempFlow-GRPO]",
        "run.model.path": str(pipeline),
        "run.model.precision": "bf16",
        "run.model.t5_max_length": str(T5_LENGTH),
        "run.model.embedding_cache": str(tmp_path / "embeddings"),
        "run.model.lora_rank": "4",
        "run.model.lora_alpha": "8.0",
        "run.prompts.train_file": str(metadata_file(tmp_path / "train.jsonl", PROMPTS)),
        "run.prompts.test_file": str(metadata_file(tmp_path / "test.jsonl", PROMPTS[:2])),
        "run.geneval_url": url,
        "run.arm.prompts_per_epoch": "1",
        "run.arm.seeds_per_prompt": "2",
        "run.arm.collection_batch": "2",
        "run.arm.microbatch_rows": "54",
        "run.arm.decode_chunk": "5",
        "run.arm.eval_steps": "4",
        "run.arm.eval_images_per_prompt": "2",
        "run.arm.eval_batch": "3",
        "run.loop.epochs": "1",
        "run.loop.eval_every": "1",
        "run.loop.checkpoint_every": "1",
        "run.wandb": "false",
    }
    overrides = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    return ["--scale", "paper", "--allow-cpu", *overrides]


def check_run(run: Path) -> dict:
    rows = read_metrics(run)
    assert [row["epoch"] for row in rows] == [0, 1]
    trained = rows[-1]
    for key in ("reward_mean", "policy_loss", "grad_norm", "eval_reward", "eval_geneval-server-strict"):
        assert torch.isfinite(torch.tensor(trained[key])), key
    inputs = json.loads((run / "inputs.json").read_text())
    assert set(inputs) == {"model", "prompts"}
    weights = load_tensors(run / "lora" / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("transformer.") for key in weights)
    assert {v.dtype for v in weights.values()} == {torch.float32}
    return trained


def test_fig_zo_flow_at_paper_scale_runs_on_tiny_real_classes(tmp_path: Path) -> None:
    with FakeGenEvalServer() as url:
        arguments = paper_arguments(tmp_path, url)
        fig_zo_flow.main([*arguments, "--runs-dir", str(tmp_path / "runs"), "--figures-dir", str(tmp_path)])
    check_run(tmp_path / "runs" / "fig_zo_flow-paper" / RUN)
    assert len(list((tmp_path / "embeddings").iterdir())) == 4  # 3 prompts and ""
    assert (tmp_path / "paper" / "fig_zo_flow.png").is_file()


@pytest.mark.slow
def test_two_processes_run_the_paper_path(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """The same through experiments.launch with two gloo processes: evaluation split and gathered,
    gradients reduced, on the accelerator's device."""
    runs = tmp_path / "runs"
    with FakeGenEvalServer() as url:
        arguments = paper_arguments(tmp_path, url)
        launch = [sys.executable, "-m", "experiments.launch", "--processes", "2", "experiments.fig_zo_flow"]
        done = subprocess.run(
            [*launch, *arguments, "--set", "run.arm.collection_batch=1", "--runs-dir", str(runs),
             "--figures-dir", str(tmp_path)],
            cwd=ROOT, env=subprocess_env, capture_output=True, text=True,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run = runs / "fig_zo_flow-paper" / RUN
    check_run(run)
    assert checkpoints.latest(run, 1) is not None, "the second process did not run"
