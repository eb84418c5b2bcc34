"""One training run of any registered method, from a structured config: ``build_arm(config)``.

The config names a method of ``baselines/registry.py``. Its entry gives everything that makes it
that method: the rsm_core arm kind that trains it, its per-row loss with the published
hyperparameters, and its own settings of the arm kind (e.g. its branching profile). A run config
can change any of them (``arm.*`` over the method's arm settings, ``objective.*`` over its loss
hyperparameters); ``resolve`` fills in and checks both, so a run directory's config.yaml holds
every value the run used.

``run`` builds the backbone with a fresh LoRA adapter, the rewards and the prompt sets, one arm per
data shard, and hands them to the shared trainer; rerunning the same command resumes an interrupted
run from its last checkpoint.

    python -m experiments.run tempflow-grpo --scale smoke      # one run, any registered method
    python -m experiments.run --config jobs/run.yaml --name R  # a full run config (a sweep's job)

Preemption: on SIGTERM or SIGUSR1 (Slurm's warning before the time limit), or when the file
``<run>/stop.request`` appears, the run finishes its current epoch (the unit a checkpoint holds),
writes a checkpoint consistent across its processes, marks itself "preempted" and exits with
``PREEMPTED_EXIT`` (75); the same command resumes it exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from baselines import registry
from baselines.method import Family, Method, Signal
from experiments import image_grids
from experiments.cli import run as run_cli
from experiments.paper_data import data_file
from rsm_core import arms, checkpoints
from rsm_core.arms import ArmKind
from rsm_core.backbones.base import POLICY
from rsm_core.backbones.lora_export import export_lora
from rsm_core.config import ConfigError, InvalidValue, load_config, require
from rsm_core.interfaces import Arm, Backbone, Reward
from rsm_core.records import RunRecord, WandbIdentity, content_fingerprint
from rsm_core.trainer import LoopConfig, Trainer
from rsm_core.world import prompts

CONFIGS = Path(__file__).parent / "configs" / "run"


@dataclass
class ModelConfig:
    # "tiny": the tiny world's model of the method's family (tiny-flow for rectified-flow methods,
    # tiny-diffusion for eps-prediction ones); "sd35": SD3.5-M (velocity); "sd15": SD1.5 (eps)
    backbone: Literal["tiny", "tiny-flow", "tiny-diffusion", "sd35", "sd15"] = "tiny"
    # sd35 / sd15: a hub id in the local cache or a directory; "" = the backbone's published weights
    # (stabilityai/stable-diffusion-3.5-medium, stable-diffusion-v1-5/stable-diffusion-v1-5)
    path: str = ""
    resolution: int = 512  # sd35 / sd15: image side in pixels (VGG-Flow's SD3.5-M runs use 1024)
    # sd35: what decodes latents for every reward: the pipeline's VAE, or the tiny autoencoder TAESD3
    # (the published VGG-Flow code's; fo_first_order spec §0.2)
    decoder: Literal["vae", "taesd3"] = "vae"
    decoder_path: str = ""  # taesd3: a hub id in the local cache or a directory; "" = madebyollin/taesd3
    lora_rank: int = 32
    lora_alpha: float = 64.0
    lora_init: str = "gaussian"  # PEFT gaussian init (A ~ N(0, 1/r^2), B = 0), as published
    # module-name suffixes the adapter wraps; empty: the backbone's published list (SD3.5-M: the
    # joint-attention projections of TempFlow-GRPO, rsm_core.backbones.architectures)
    lora_targets: list[str] = field(default_factory=list)
    t5_max_length: int = 128  # sd35: T5 tokens of the prompt embeddings, as published
    # sd35: fp16 / bf16 = frozen weights in that dtype, LoRA fp32, autocast forward, TF32 (paper
    # configs: fp16 with gradient checkpointing, as published; see rsm_core.backbones.stable_diffusion)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    # Deviation (named): frozen weights stored in the half precision; the published code keeps them in
    # fp32 under autocast (false). Autocast computes in half either way; this saves 4.5 GiB per GPU.
    half_frozen_weights: bool = True
    gradient_checkpointing: bool = False
    # sd35: prompt embeddings on disk (make paper-embeddings fills it); the text encoders are freed
    # once every prompt of the run is there
    embedding_cache: str = "~/.cache/rsm_bench/prompt-embeddings"

    def __post_init__(self) -> None:
        require(self.lora_rank >= 1, "lora_rank", "must be at least 1")
        require(self.lora_alpha > 0, "lora_alpha", "must be positive")
        require(self.t5_max_length >= 1, "t5_max_length", "must be at least 1")
        require(self.resolution >= 1, "resolution", "must be a positive number of pixels")
        require(
            self.decoder == "vae" or self.backbone == "sd35", "decoder", "taesd3 decodes SD3.5-M latents only"
        )


@dataclass
class PromptConfig:
    # "tiny-geneval": the tiny world's disjoint GenEval-format train/test splits. "files": one prompt
    # per line (.txt) or GenEval metadata (.jsonl): a path, or a name under the data root where
    # `make paper-data` puts them (experiments/configs/paper_data.yaml), e.g. pickscore/train.txt.
    source: Literal["tiny-geneval", "files"] = "tiny-geneval"
    train_file: str = ""
    test_file: str = ""
    eval_prompts: int = 0  # first n test prompts (0 = all)

    def __post_init__(self) -> None:
        require(self.eval_prompts >= 0, "eval_prompts", "must not be negative (0 = every test prompt)")


@dataclass
class RunConfig:
    method: str = "tempflow-grpo"  # a trainable method of baselines/registry.py
    seed: int = 42  # rollout noise, prompt draws and the LoRA initialisation; shard r uses seed + r
    model: ModelConfig = field(default_factory=ModelConfig)
    # the training reward: the tiny world's (shapes_*), or at paper scale "aesthetic" (LAION), "pickscore",
    # "hpsv2" (HPSv2.1) or "geneval-server" (the remote GenEval detector; "-strict" variants for evaluation)
    reward: str = "shapes_aesthetic"
    eval_extra: list[str] = field(default_factory=list)  # more rewards measured at each evaluation
    geneval_url: str = ""  # geneval-server: "" = $TEMPFLOW_GENEVAL_REWARD_URL or http://127.0.0.1:18085
    geneval_wire: Literal["json", "pickle"] = "pickle"  # Flow-GRPO's reward server speaks pickle
    prompts: PromptConfig = field(default_factory=PromptConfig)
    # settings of the method's arm kind (rsm_core.arms), over the method's own (e.g. its profile)
    arm: dict[str, Any] = field(default_factory=dict)
    # the method's loss hyperparameters, over its published ones (baselines/<method>.py)
    objective: dict[str, Any] = field(default_factory=dict)
    loop: LoopConfig = field(default_factory=LoopConfig)
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    # data-parallel shards run one after another in each process (gradients averaged): W processes
    # x 1 shard and 1 process x W shards give the same update (the 1gpu scale uses the latter)
    shards: int = 1
    # GiB of one GPU: the memory plan's budget (experiments/plan.py); a GPU sweep whose plan exceeds
    # it refuses to start. 80: the paper's GPUs; the 1gpu configs set 24.
    gpu_memory_gb: float = 80.0
    wandb: bool = True
    # test prompts of the image grids saved before training and after it (eval_grid_start.png,
    # eval_grid_end.png: fixed prompts and noise, to judge reward hacking by eye); 0: none
    grid_images: int = 4

    def __post_init__(self) -> None:
        require(self.shards >= 1, "shards", "must be at least 1")
        require(self.grid_images >= 0, "grid_images", "must not be negative (0 = no image grids)")
        require(self.threads >= 0, "threads", "must not be negative (0 = torch's default)")
        require(self.gpu_memory_gb > 0, "gpu_memory_gb", "must be positive (GiB of one GPU)")


# ------------------------------------------------------------------------------------------------
# Resolving a config against the registry
# ------------------------------------------------------------------------------------------------


def trainable_method(name: str, key: str = "method") -> Method:
    try:
        method = registry.get(name)
    except KeyError:
        method = None
    if method is None or not method.trainable:
        names = [m.name for m in registry.trainable()]
        raise InvalidValue(key, f"{name!r} is not a trainable registered method; choose one of {names}")
    return method


def _instantiate(schema: type, layers: list[Any], key: str) -> Any:
    """``schema``'s defaults, then each layer, as a checked dataclass instance (errors name ``key``)."""
    node = OmegaConf.structured(schema)
    try:
        for layer in layers:
            node = OmegaConf.merge(node, layer)
        return OmegaConf.to_object(node)
    except InvalidValue as error:
        raise (error.under(key) if key else error) from None
    except OmegaConfBaseException as error:
        detail = str(error).splitlines()[0]
        where = getattr(error, "full_key", "") or ""
        full = ".".join(part for part in (key, where) if part)
        raise ConfigError(f"bad config key or value '{full}': {detail}") from None


@dataclass(frozen=True)
class Sections:
    """A run config resolved against the registry: every section a checked dataclass."""

    run: RunConfig  # arm and objective hold the full resolved dicts
    method: Method
    kind: ArmKind
    arm: Any  # the kind's config
    objective: Any  # the method's loss config


def sections(cfg: DictConfig | RunConfig, prefix: str = "") -> Sections:
    """Check ``cfg`` and complete its arm and objective from the method's registry entry.

    Order, lowest first: the arm kind's defaults, the method's own settings of it, the config's
    ``arm``; the method's published loss hyperparameters, the config's ``objective``. ``prefix``
    is where the run config sits in a larger one (``run.`` in a sweep), for the error messages.
    """
    node = OmegaConf.structured(cfg) if not isinstance(cfg, DictConfig) else cfg
    method = trainable_method(node.method, f"{prefix}method")
    kind = arms.kind(method.arm)
    arm = _instantiate(kind.config, [method.arm_config, node.arm], f"{prefix}arm")
    objective = _instantiate(
        type(method.config), [dataclasses.asdict(method.config), node.objective], f"{prefix}objective"
    )
    for name in ("model", "prompts", "loop"):
        _instantiate(type(getattr(RunConfig(), name)), [node[name]], f"{prefix}{name}")
    run = _instantiate(RunConfig, [node], prefix.rstrip("."))
    run.model.backbone = model_family(method, run.model.backbone, f"{prefix}model.backbone")
    run.arm, run.objective = dataclasses.asdict(arm), dataclasses.asdict(objective)
    return Sections(run, method, kind, arm, objective)


# the flow each backbone samples: rectified flow with velocity ("v") or VP with eps ("eps")
BACKBONE_PREDICTION = {"tiny-flow": "v", "sd35": "v", "tiny-diffusion": "eps", "sd15": "eps"}
PAPER_BACKBONES = ("sd35", "sd15")  # real weights, loaded by load_paper_backbone


def model_family(method: Method, backbone: str, key: str) -> str:
    """``backbone`` with "tiny" resolved to the tiny world's model of the method's family; a model of
    the other family (a diffusion method on a flow) is a config error naming the right one."""
    prediction = method.grid().kernel.point.prediction
    fitting = [name for name, kind in BACKBONE_PREDICTION.items() if kind == prediction]
    if backbone == "tiny":
        return next(name for name in fitting if name.startswith("tiny"))
    if BACKBONE_PREDICTION[backbone] != prediction:
        raise InvalidValue(
            key, f"{method.name} trains a {prediction}-prediction model; choose one of {fitting}"
        )
    return backbone


def resolve(cfg: DictConfig | RunConfig, prefix: str = "") -> DictConfig:
    """The fully resolved, checked, read-only run config (what config.yaml records)."""
    resolved = OmegaConf.structured(sections(cfg, prefix).run)
    OmegaConf.set_readonly(resolved, True)
    return resolved


# ------------------------------------------------------------------------------------------------
# The parts of a run
# ------------------------------------------------------------------------------------------------


def read_prompts(path: str) -> list[dict]:
    """GenEval metadata (.jsonl) as is, or a text file's lines as {"prompt": line}; ``path`` is
    resolved by ``data_file`` (as given, else under the data root)."""
    file = data_file(path)
    if file.suffix == ".jsonl":
        return prompts.read_jsonl(file)
    return [{"prompt": line.strip()} for line in file.read_text().splitlines() if line.strip()]


def prompt_sets(config: PromptConfig) -> tuple[list[dict], list[dict]]:
    if config.source == "tiny-geneval":
        train, test = prompts.split()
    else:
        train, test = read_prompts(config.train_file), read_prompts(config.test_file)
    return train, test[: config.eval_prompts] if config.eval_prompts else test


def paper_weights(config: ModelConfig) -> dict[str, Path]:
    """The local folders a paper backbone loads (its pipeline, and TAESD3 if it decodes with it),
    checked for completeness: an AssetError names what is missing and the `hf download` command."""
    from rsm_core.backbones import stable_diffusion as sd

    repo, components = sd.PUBLISHED_WEIGHTS[config.backbone]
    folders = {"model": sd.resolve_weights(config.path or repo, components, repo)}
    if config.decoder == "taesd3":
        source = config.decoder_path or sd.TAESD3_REPO
        folders["decoder"] = sd.resolve_model(source, sd.TAESD3_REPO, "model.decoder_path")
    return folders


def load_paper_backbone(config: ModelConfig, device: str | torch.device):
    """SD3.5-M or SD1.5 from local weights at the configured resolution, precision and decoder, with
    the disk cache of prompt embeddings (SD3.5-M: T5 at the configured length)."""
    from rsm_core.backbones import stable_diffusion as sd

    if config.backbone not in PAPER_BACKBONES:
        raise ValueError(f"model.backbone={config.backbone!r} is not a paper backbone {PAPER_BACKBONES}")
    common = dict(
        device=device,
        resolution=config.resolution,
        cache_dir=Path(config.embedding_cache).expanduser(),
        precision=config.precision,
        half_frozen_weights=config.half_frozen_weights,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    path = config.path or sd.PUBLISHED_WEIGHTS[config.backbone][0]
    if config.backbone == "sd15":
        return sd.SD15(path, **common)
    return sd.SD35(
        path,
        max_sequence_length=config.t5_max_length,
        decoder=config.decoder,
        decoder_path=config.decoder_path or sd.TAESD3_REPO,
        **common,
    )


def build_backbone(config: ModelConfig, seed: int, device: str | torch.device = "cpu") -> Backbone:
    """The backbone with a fresh policy LoRA adapter drawn from ``seed`` (the same on every process).
    The tiny world runs on the CPU; SD3.5-M and SD1.5 on ``device`` (samplers keep their states on the
    CPU and the backbone moves inputs and outputs)."""
    if config.backbone in PAPER_BACKBONES:
        backbone = load_paper_backbone(config, device)
    else:
        from rsm_core.world.assets import load_backbones

        if config.backbone not in ("tiny-flow", "tiny-diffusion"):
            raise ValueError(
                f"model.backbone={config.backbone!r} is unresolved; build from sections(config).run"
            )
        tiny = load_backbones()
        backbone = tiny.diffusion if config.backbone == "tiny-diffusion" else tiny.flow
    torch.manual_seed(seed)
    backbone.add_lora(
        config.lora_rank, config.lora_alpha, config.lora_init, name=POLICY, targets=config.lora_targets
    )
    return backbone


def reward_functions(config: RunConfig, device: str | torch.device = "cpu") -> dict[str, Reward]:
    """Every reward the run names (training and extra evaluation), with a clear error for the others.
    Reward networks run on ``device``: under accelerate each process has one CPU thread, and the
    LAION predictor on it took about an hour per paper epoch."""
    names = [config.reward, *config.eval_extra]
    available: dict[str, Reward] = {}
    if config.model.backbone.startswith("tiny"):
        from reward_models.world import world_rewards

        available |= world_rewards()
    if any(name.startswith("geneval-server") for name in names):
        from reward_models.geneval_server import GenEvalServerReward

        url = config.geneval_url or None
        available["geneval-server"] = GenEvalServerReward(url, wire=config.geneval_wire)
        available["geneval-server-strict"] = GenEvalServerReward(
            url, wire=config.geneval_wire, score="strict"
        )
    if "aesthetic" in names:  # the LAION aesthetic predictor (CLIP ViT-L/14 + MLP head), paper scale
        from reward_models.laion_aesthetic import LAIONAesthetic

        available["aesthetic"] = LAIONAesthetic(device=device)
    if "pickscore" in names:  # PickScore (CLIP ViT-H/14), divided by 26 as Flow-GRPO logs it
        from reward_models.pickscore import PickScore

        available["pickscore"] = PickScore(device=device)
    if "hpsv2" in names:  # HPSv2.1 (CLIP ViT-H/14), the first-order runs' reward: cosine, no logit scale
        from reward_models.hpsv2 import HPSv2

        available["hpsv2"] = HPSv2(device=device)
    missing = [name for name in names if name not in available]
    if missing:
        raise ConfigError(
            f"reward(s) {missing} are not available for backbone {config.model.backbone!r}; available: "
            f"{sorted(available)} (the tiny world's rewards score the tiny backbones' images)"
        )
    return {name: available[name] for name in names}


@dataclass
class Parts:
    """What the shards of one process share: the backbone, the rewards and the prompt sets."""

    backbone: Backbone
    rewards: dict[str, Reward]
    train: list[dict]
    test: list[dict]


def build_parts(config: RunConfig, device: str | torch.device = "cpu") -> Parts:
    backbone = build_backbone(config.model, config.seed, device)
    train, test = prompt_sets(config.prompts)
    if config.model.backbone in PAPER_BACKBONES:  # every prompt embedded on disk, then the text encoders go
        backbone.precompute(run_prompts(train, test))
        backbone.drop_text_encoders()
    return Parts(backbone, reward_functions(config, device), train, test)


def run_prompts(train: list[dict], test: list[dict]) -> list[str]:
    """Every prompt a run conditions on: its train and test prompts and the empty one of CFG."""
    return list(dict.fromkeys([m["prompt"] for m in train + test] + [""]))


def build_arm(
    config: DictConfig | RunConfig | Sections, parts: Parts | None = None, *, rank: int = 0, world: int = 1
) -> Arm:
    """The arm of ``config``'s method for data shard ``rank`` of ``world`` (parts built if not given)."""
    resolved = config if isinstance(config, Sections) else sections(config)
    parts = parts or build_parts(resolved.run)
    run = resolved.run
    return resolved.kind.arm(
        parts.backbone,
        parts.rewards[run.reward],
        resolved.method.objective(resolved.objective),
        parts.train,
        parts.test,
        resolved.arm,
        seed=run.seed,
        rank=rank,
        world=world,
        eval_extra={name: parts.rewards[name] for name in run.eval_extra},
    )


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def accelerator_if_launched():
    """An accelerate Accelerator when started by `accelerate launch` / torchrun with several
    processes, else None (a plain single-process run needs no process group)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def run_inputs(config: DictConfig | RunConfig) -> dict:
    """What a run reads besides its config and must match to be resumed or reused: fingerprints of
    the weights (the tiny world's manifest, or the paper backbone's folders), the aesthetic head, the
    HPS checkpoint and the prompt files (rsm_core.records.content_fingerprint). A missing file is an
    error here, before any run."""
    inputs: dict[str, str | dict[str, str]] = {}
    if config.model.backbone in PAPER_BACKBONES:
        inputs |= {name: content_fingerprint(folder) for name, folder in paper_weights(config.model).items()}
    else:
        from rsm_core.world.assets import world_fingerprint

        inputs["tiny_world"] = world_fingerprint()
    if "aesthetic" in [config.reward, *config.eval_extra]:
        from reward_models.laion_aesthetic import default_head_path

        head = default_head_path()
        if head.is_file():  # without it the reward's loader stops, naming where to get it
            inputs["aesthetic_head"] = content_fingerprint(head)
    if "hpsv2" in [config.reward, *config.eval_extra]:
        from reward_models.hpsv2 import find_checkpoint

        checkpoint = find_checkpoint()
        if checkpoint is not None:  # without it the reward's loader stops, naming where to get it
            inputs["hpsv2_checkpoint"] = content_fingerprint(checkpoint)
    if config.prompts.source == "files":
        files = {"train": config.prompts.train_file, "test": config.prompts.test_file}
        inputs["prompts"] = {split: content_fingerprint(data_file(file)) for split, file in files.items()}
    return inputs


def training_device(accelerator, backbone: str, allow_cpu: bool) -> torch.device:
    """The accelerator's device, or CUDA when there is one; a paper-scale backbone on the CPU (days
    per epoch) only when asked for."""
    device = torch.device(
        accelerator.device if accelerator else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cpu" and not backbone.startswith("tiny") and not allow_cpu:
        raise ConfigError(
            f"model.backbone={backbone} is paper scale and this process sees no CUDA GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run it on a GPU "
            f"node, or add --allow-cpu to run it on the CPU anyway (tests with tiny random models do)"
        )
    return device


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: checkpointed on request; rerunning the same command resumes
STOP_FILE = "stop.request"  # created by a job wrapper that cannot signal the training processes
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """The run stopped on request after a checkpoint; exits the program with ``PREEMPTED_EXIT``."""

    def __init__(self, run_dir: Path, epoch: int) -> None:
        super().__init__(PREEMPTED_EXIT)
        self.run_dir, self.epoch = run_dir, epoch

    def __str__(self) -> str:
        return (
            f"{self.run_dir} stopped on request after checkpointing epoch {self.epoch}; rerun the same "
            f"command to resume it (exit code {PREEMPTED_EXIT})"
        )


@contextmanager
def stop_requests(run_dir: Path, handle_signals: bool) -> Iterator[Callable[[], bool]]:
    """While training: whether a stop was asked for, by the run's stop file or (``handle_signals``,
    for the command-line entries, not for a library caller) by SIGTERM / SIGUSR1 to this process.
    The handlers only set a flag, so the current epoch always completes."""
    received: list[int] = []
    stop_file = Path(run_dir) / STOP_FILE
    installed = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        for number in STOP_SIGNALS:
            installed[number] = signal.signal(number, lambda signum, _frame: received.append(signum))
    try:
        yield lambda: bool(received) or stop_file.exists()
    finally:
        for number, previous in installed.items():
            signal.signal(number, previous)


def run_identity(
    resolved: Sections, *, name: str, group: str | None, job_type: str | None, scale: str, seed: int
) -> WandbIdentity:
    """The run's place in wandb: its sweep, its arm, and tags to filter by (method, order, model
    family, baseline or redesign, backbone, reward, scale, seed)."""
    method = resolved.method
    order = {Signal.STEIN: "zeroth-order", Signal.REWARD_GRADIENT: "first-order"}.get(method.signal, "other")
    model = "flow" if BACKBONE_PREDICTION[resolved.run.model.backbone] == "v" else "diffusion"
    kind = "redesign" if method.family is Family.REDESIGN else "baseline"
    tags = (
        f"method:{method.name}",
        f"family:{order}",
        f"model:{model}",
        f"kind:{kind}",
        f"backbone:{resolved.run.model.backbone}",
        f"reward:{resolved.run.reward}",
        f"scale:{scale}",
        f"seed:{seed}",
    )
    return WandbIdentity(group=group, job_type=job_type or method.name, tags=tags, name=name)


def run(
    config: DictConfig | RunConfig,
    runs_dir: Path,
    name: str,
    allow_cpu: bool = False,
    identity: WandbIdentity | None = None,
    handle_signals: bool = False,
    progress: bool = True,
) -> Path:
    """Train one run to completion (or resume it); returns the run directory. A stop request
    (``stop_requests``) ends it early with ``Preempted`` after a checkpoint."""
    resolved = sections(config)
    settings = resolved.run
    if settings.threads:
        torch.set_num_threads(settings.threads)
    accelerator = accelerator_if_launched()
    device = training_device(accelerator, settings.model.backbone, allow_cpu)
    rank = accelerator.process_index if accelerator else 0
    run_dir = Path(runs_dir) / name
    record = None
    if rank == 0:
        record = RunRecord.create_or_resume(
            runs_dir,
            name,
            OmegaConf.structured(settings),
            wandb=settings.wandb,
            inputs=run_inputs(settings),
            identity=identity,
        )
        (run_dir / STOP_FILE).unlink(missing_ok=True)  # a request that stopped the last attempt
    if accelerator is not None:
        accelerator.wait_for_everyone()  # the run directory exists before any process uses it
    started = time.perf_counter()
    try:
        with stop_requests(run_dir, handle_signals) as should_stop:
            epochs, finished = _train(resolved, accelerator, device, record, run_dir, progress, should_stop)
    except BaseException as error:
        if record is not None:
            record.fail(error)
        raise
    finally:
        release_memory()
    if not finished:
        if record is not None:
            record.preempt(epochs)
            (run_dir / STOP_FILE).unlink(missing_ok=True)
        raise Preempted(run_dir, epochs)
    if record is not None:
        record.finish({"epochs": epochs, "seconds": round(time.perf_counter() - started, 1)})
    return run_dir


def _train(
    resolved: Sections,
    accelerator,
    device: torch.device,
    record: RunRecord | None,
    run_dir: Path,
    progress: bool,
    should_stop: Callable[[], bool],
) -> tuple[int, bool]:
    """Build the run's parts and train them; returns the epochs done and whether the run finished.
    Everything it builds is local, so release_memory can free it when it returns."""
    settings = resolved.run
    processes, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    parts = build_parts(settings, device)
    world = processes * settings.shards
    shards = [
        build_arm(resolved, parts, rank=rank * settings.shards + s, world=world)
        for s in range(settings.shards)
    ]
    trainer = Trainer(shards, settings.loop, accelerator, loss_scaling=settings.model.precision == "fp16")
    grids = record is not None and settings.grid_images > 0
    fresh = checkpoints.read_manifest(run_dir) is None
    if grids and fresh:  # before any update the policy is the reference (LoRA B = 0)
        save_evaluation_grid(resolved, parts, record, image_grids.START, epoch=0)
    finished = trainer.run(run_dir, record, progress=progress, should_stop=should_stop)
    if finished and record is not None:  # the policy as evaluated (EMA), for pipe.load_lora_weights
        with trainer.evaluated_weights():
            export_lora(parts.backbone.model, POLICY, run_dir / "lora")
            if grids:
                save_evaluation_grid(resolved, parts, record, image_grids.END, epoch=trainer.epoch)
    return trainer.epoch, finished


def save_evaluation_grid(resolved: Sections, parts: Parts, record: RunRecord, name: str, epoch: int) -> None:
    """The run's first ``grid_images`` test prompts sampled with the arm's evaluation steps, guidance
    and seed (the same noise at the start and the end), saved in the run directory and to wandb."""
    arm = resolved.arm
    prompts = [meta["prompt"] for meta in parts.test[: resolved.run.grid_images]]
    steps = getattr(arm, "eval_steps", None) or arm.sampler_steps  # first-order arms evaluate on their grid
    seed = getattr(arm, "eval_seed", 0)
    images = image_grids.evaluation_images(parts.backbone, prompts, steps, arm.cfg, seed)
    image_grids.save_grid(images, record.path / name, captions=prompts)
    record.log_image(Path(name).stem, record.path / name, epoch)


def release_memory() -> None:
    """Free what a finished run built before the next run of a sweep loads its own: the backbone and
    its arms hold reference cycles, which Python's collector frees only when Python objects (not GPU
    bytes) pile up, so a 30 GiB pipeline would outlive its run."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def scale_files(method: Method, scale: str) -> list[Path]:
    """A scale's sizes for ``method``: its arm kind's file (<kind>/<scale>.yaml), then, where there is
    one, the kind's file for the method's model family (<kind>/<scale>.eps.yaml or .v.yaml: e.g. the
    uw-sigma sampler of the diffusion methods needs more steps than the flow ones take)."""
    file = CONFIGS / method.arm / f"{scale}.yaml"
    if not file.is_file():
        scales = sorted(path.stem for path in file.parent.glob("*.yaml") if "." not in path.stem)
        raise ConfigError(f"{method.name} has no {scale} scale ({file}); its scales are {scales}")
    family = CONFIGS / method.arm / f"{scale}.{method.grid().kernel.point.prediction}.yaml"
    return [file, family] if family.is_file() else [file]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("method", nargs="?", help=f"one of {[m.name for m in registry.trainable()]}")
    parser.add_argument("--scale", default="tiny", help=f"smoke | tiny ({CONFIGS}/<arm kind>/*.yaml)")
    parser.add_argument("--config", type=Path, help="a full run config (YAML) instead of METHOD --scale")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--name", help="run directory name (default: <method>-<scale>-seed<seed>)")
    parser.add_argument("--runs-dir", type=Path, default=Path("results/runs"))
    parser.add_argument("--group", help="wandb group: the sweep this run belongs to")
    parser.add_argument("--job-type", help="wandb job type: the run's arm (default: the method)")
    parser.add_argument("--seed-label", type=int, help="the seed tag in wandb (default: the config's seed)")
    parser.add_argument("--allow-cpu", action="store_true", help="run a paper-scale model without a GPU")
    args = parser.parse_args(argv)
    if (args.method is None) == (args.config is None):
        raise ConfigError("name a METHOD (with --scale) or give --config FILE, not both")
    if args.config is not None:
        cfg = load_config(RunConfig, args.config, overrides=args.set)
    else:
        method = trainable_method(args.method)
        cfg = load_config(
            RunConfig, *scale_files(method, args.scale), overrides=[f"method={args.method}", *args.set]
        )
    resolved = sections(cfg)
    seed = resolved.run.seed
    name = args.name or f"{resolved.method.name}-{args.scale}-seed{seed}"
    identity = run_identity(
        resolved,
        name=f"{args.group}/{name}" if args.group else name,
        group=args.group,
        job_type=args.job_type,
        scale=args.scale,
        seed=seed if args.seed_label is None else args.seed_label,
    )
    started = time.perf_counter()
    try:
        resolved_config = resolve(cfg)
        path = run(resolved_config, args.runs_dir, name, args.allow_cpu, identity, handle_signals=True)
    except Preempted as stop:
        print(stop, file=sys.stderr)
        raise
    print(f"{name} done in {(time.perf_counter() - started) / 60:.1f} min: {path}")


if __name__ == "__main__":
    run_cli(main)
