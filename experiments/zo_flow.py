"""One zeroth-order flow-matching run (TempFlow-GRPO or a redesign) from a structured config.

Shared by `make fig3` and `make fig-zo-flow`: builds the backbone (the tiny flow model or SD3.5-M),
adds LoRA, picks the reward and the prompt sets, and hands a ``ZOBranchArm`` to the shared trainer.
A rerun of the same command resumes an interrupted run from its last checkpoint.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from omegaconf import OmegaConf

from rsm_core.backbones.base import Backbone
from rsm_core.config import ConfigError
from rsm_core.records import RunRecord
from rsm_core.trainer import LoopConfig, Trainer
from rsm_core.world import prompts
from rsm_core.zo_branch import RewardFn, ZOBranchArm, ZOBranchConfig


@dataclass
class ModelConfig:
    backbone: Literal["tiny-flow", "sd35"] = "tiny-flow"
    path: str = "stabilityai/stable-diffusion-3.5-medium"  # sd35: hub id (local cache) or directory
    lora_rank: int = 32
    lora_alpha: float = 64.0
    lora_init: str = "gaussian"  # PEFT gaussian init (A ~ N(0, 1/r^2), B = 0), as published


@dataclass
class PromptConfig:
    # "tiny-geneval": the tiny world's disjoint GenEval-format train/test splits. "files": one prompt
    # per line (.txt) or GenEval metadata (.jsonl), e.g. Pick-a-Pic's train.txt / test.txt.
    source: Literal["tiny-geneval", "files"] = "tiny-geneval"
    train_file: str = ""
    test_file: str = ""
    eval_prompts: int = 0  # first n test prompts (0 = all)


@dataclass
class ZOFlowRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    # the training reward: the tiny world's (shapes_*), or at paper scale "aesthetic" (LAION) or
    # "geneval-server" (the remote GenEval detector; "-strict" variants for evaluation)
    reward: str = "shapes_aesthetic"
    eval_extra: list[str] = field(default_factory=list)  # more rewards measured at each evaluation
    geneval_url: str = ""  # geneval-server: "" = $TEMPFLOW_GENEVAL_REWARD_URL or http://127.0.0.1:18085
    geneval_wire: Literal["json", "pickle"] = "pickle"  # Flow-GRPO's reward server speaks pickle
    prompts: PromptConfig = field(default_factory=PromptConfig)
    arm: ZOBranchConfig = field(default_factory=ZOBranchConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    # data-parallel shards run one after another in each process (gradients averaged): W processes
    # x 1 shard and 1 process x W shards give the same update (the 1gpu scale uses the latter)
    shards: int = 1
    wandb: bool = True


def read_prompts(path: str) -> list[dict]:
    """GenEval metadata (.jsonl) as is, or a text file's lines as {"prompt": line}."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file {file} does not exist; set prompts.train_file / test_file")
    if file.suffix == ".jsonl":
        return prompts.read_jsonl(file)
    return [{"prompt": line.strip()} for line in file.read_text().splitlines() if line.strip()]


def prompt_sets(config: PromptConfig) -> tuple[list[dict], list[dict]]:
    if config.source == "tiny-geneval":
        train, test = prompts.split()
    else:
        train, test = read_prompts(config.train_file), read_prompts(config.test_file)
    return train, test[: config.eval_prompts] if config.eval_prompts else test


def build_backbone(
    config: ModelConfig, device: str | torch.device = "cpu"
) -> tuple[Backbone, dict[str, RewardFn]]:
    """The backbone with a fresh LoRA adapter, and the local rewards that can score its images. The
    tiny world runs on the CPU; SD3.5-M on ``device`` (samplers keep their states on the CPU and the
    adapter moves inputs and outputs)."""
    if config.backbone == "sd35":
        from rsm_core.backbones.stable_diffusion import SD35

        backbone, rewards = SD35(config.path, device=device), {}
    else:
        from reward_models.shapes_geneval import ShapesGenEval
        from rsm_core.world.assets import load_world

        world = load_world()
        backbone = world.flow
        geneval = {
            "shapes_geneval": ShapesGenEval("partial"),
            "shapes_geneval_strict": ShapesGenEval("strict"),
        }
        rewards = {**world.rewards, **geneval}
    backbone.model.requires_grad_(False)
    backbone.add_lora(config.lora_rank, config.lora_alpha, config.lora_init)
    return backbone, rewards


def reward_functions(config: ZOFlowRunConfig, local: dict[str, RewardFn]) -> dict[str, RewardFn]:
    """Every reward the run names (training and extra evaluation), with a clear error for the others."""
    available = dict(local)
    names = [config.reward, *config.eval_extra]
    if any(name.startswith("geneval-server") for name in names):
        from reward_models.geneval_server import GenEvalServerReward

        url = config.geneval_url or None
        available["geneval-server"] = GenEvalServerReward(url, wire=config.geneval_wire)
        available["geneval-server-strict"] = GenEvalServerReward(
            url, wire=config.geneval_wire, score="strict"
        )
    if "aesthetic" in names:  # the LAION aesthetic predictor (CLIP ViT-L/14 + MLP head), paper scale
        from reward_models.laion_aesthetic import LAIONAesthetic

        available["aesthetic"] = LAIONAesthetic()
    missing = [name for name in names if name not in available]
    if missing:
        raise ConfigError(
            f"reward(s) {missing} are not available for backbone {config.model.backbone!r}; available: "
            f"{sorted(available)} (the tiny world's rewards score the tiny backbones' images)"
        )
    return {name: available[name] for name in names}


def accelerator_if_launched():
    """An accelerate Accelerator when started by `accelerate launch` / torchrun with several
    processes, else None (a plain single-process run needs no process group)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def run_inputs(config) -> dict:
    """What a run reads besides its config and must match to be resumed or reused: the tiny world's
    weight fingerprints (SD3.5 weights are named by their path in the config)."""
    if config.model.backbone == "sd35":
        return {}
    from rsm_core.world.assets import world_fingerprint

    return {"tiny_world": world_fingerprint()}


def run_zo_flow(config, runs_dir: Path, name: str, progress: bool = True) -> Path:
    """Train one arm to completion (or resume it); returns the run directory."""
    if config.threads:
        torch.set_num_threads(config.threads)
    accelerator = accelerator_if_launched()
    processes, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    record = (
        RunRecord.create_or_resume(runs_dir, name, config, wandb=config.wandb, inputs=run_inputs(config))
        if rank == 0
        else None
    )
    if accelerator is not None:
        accelerator.wait_for_everyone()  # the run directory exists before any process uses it
    config = OmegaConf.to_object(config)  # plain dataclasses from here on (the record keeps the YAML)
    started = time.perf_counter()
    try:
        torch.manual_seed(config.arm.seed)  # the LoRA initialisation, identical on every process
        device = accelerator.device if accelerator else ("cuda" if torch.cuda.is_available() else "cpu")
        backbone, rewards = build_backbone(config.model, device)
        train, test = prompt_sets(config.prompts)
        scorers = reward_functions(config, rewards)
        extra = {name: scorers[name] for name in config.eval_extra}
        world = processes * config.shards
        shards = [
            ZOBranchArm(
                backbone,
                scorers[config.reward],
                train,
                test,
                config.arm,
                rank * config.shards + s,
                world,
                extra,
            )
            for s in range(config.shards)
        ]
        trainer = Trainer(shards, config.loop, accelerator)
        trainer.run(Path(runs_dir) / name, record, progress=progress)
    except BaseException as error:
        if record is not None:
            record.fail(error)
        raise
    if record is not None:
        record.finish({"epochs": trainer.epoch, "seconds": round(time.perf_counter() - started, 1)})
    return Path(runs_dir) / name
