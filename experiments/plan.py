"""Per-GPU memory plan of a paper-scale run (`make plan SCALE=paper|1gpu FIG=fig3|fig_zo_flow`).

A paper run that does not fit its GPU fails hours in, after loading and embedding; the plan says
before launch. Weights come from the published configs built on the meta device (no weights, no
memory). Activation bytes are measured, not guessed: a reduced-depth copy of the real SD3.5-M
transformer (full width, real token count) runs one training forward and backward on the CPU under
bf16 autocast (fp16 stores the same bytes), counting what autograd saves per block, and a no-grad
forward and a VAE decode run under a tracker of live tensor bytes. Depth enters only through the
saved bytes, which add up per block; everything else scales with the sequences of a model call.

    python -m experiments.plan --figure fig3 --scale paper

A sweep of SD3.5-M runs on GPUs refuses to start when its plan exceeds ``run.gpu_memory_gb``
(``check_fits``), naming the setting to turn down.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from experiments.cli import run as run_cli
from experiments.run import RunConfig, sections
from experiments.sweep import SweepConfig, arm_config
from rsm_core.backbones import architectures
from rsm_core.config import ConfigError, load_config
from rsm_core.records import atomic_write_text

GIB = 2**30
CONFIGS = Path(__file__).parent / "configs"
TABLES = Path("results/tables")
CACHE = Path("~/.cache/rsm_bench/plan-measurements.json")

RESOLUTION = 512  # the paper's images: 16 x 64 x 64 latents, 1024 image tokens at patch 2
CLIP_TOKENS = 77  # SD3's text sequence: CLIP-L/G's 77 tokens, then T5's t5_max_length
REDUCED_LAYERS = 3  # blocks of the measured copy: one MMDiT-X (dual attention), one plain, the last
# An assumption, not measured: what the CUDA context and the caching allocator's slack take before
# any tensor (a few hundred MiB on current drivers).
CUDA_CONTEXT_GIB = 0.5

# SD3.5-M's VAE (vae/config.json): AutoencoderKL, 16 latent channels, no quant convs.
SD35_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# openai/clip-vit-large-patch14 (the aesthetic reward's CLIP) and SD3.5-M's three text encoders
CLIP_VIT_L_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
CLIP_VIT_L_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    projection_dim=768,
)
CLIP_G_TEXT = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)
T5_XXL = dict(
    d_model=4096,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    d_kv=64,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
)

# What to turn down when a phase does not fit (the phase's own knob first).
KNOBS = {
    "load": ("run.model.precision", "fp16 keeps the text encoders in half precision"),
    "rollout": ("run.arm.chunk", "rows per rollout model call"),
    "decode": ("run.arm.decode_chunk", "images per VAE decode"),
    "training": ("run.arm.microbatch_rows", "rows per training microbatch"),
    "evaluation": ("run.arm.eval_batch", "test images per sampling call"),
}


# ------------------------------------------------------------------------------------------------
# Measuring on the CPU
# ------------------------------------------------------------------------------------------------


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under it that are still alive, and their peak: a CPU
    stand-in for CUDA's max_memory_allocated (kernels' internal scratch is not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if _is_tensor(t)}
        for tensor in tree_leaves(out):
            if _is_tensor(tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key in self.live or key in inputs or storage.nbytes() == 0:
                    continue  # already counted, or an input's (in-place ops and views)
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, key)  # storages die with their last tensor
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def restart_peak(self) -> int:
        self.peak = self.now
        return self.now


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


class _SavedBytes:
    """Bytes autograd keeps for the backward pass, by the block that saved them ("rest": embedders
    and the output layers). Each storage counts once (views and tensors saved twice), parameters
    not at all (they are weights, already counted)."""

    def __init__(self, parameters: set[int]) -> None:
        self.parameters, self.seen = parameters, set()
        self.by_label: dict[str, int] = {}
        self.label = "rest"

    def reset(self) -> None:
        self.seen, self.by_label, self.label = set(), {}, "rest"

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.parameters and key not in self.seen:
            self.seen.add(key)
            self.by_label[self.label] = self.by_label.get(self.label, 0) + storage.nbytes()
        return tensor

    @contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        self.label = label
        try:
            yield
        finally:
            self.label = "rest"


@dataclass(frozen=True)
class Activations:
    """Measured bytes per sequence (one row's conditional or unconditional half under CFG)."""

    saved: dict[str, float]  # autograd-saved bytes: "rest" and one block of each kind
    backward: float  # extra live bytes while the backward runs (one block recomputed, gradients)
    inference: float  # peak live bytes of a no-grad forward (one block's intermediates at a time)
    layers: int  # depth of the measured copy
    seconds: float

    def saved_for(self, layers: int, dual: int) -> float:
        """Saved bytes of a ``layers``-deep model with ``dual`` MMDiT-X blocks first and the last block
        context_pre_only: the measured per-block bytes added up."""
        plain = layers - dual - 1
        return (
            self.saved["rest"] + dual * self.saved["dual"] + plain * self.saved["plain"] + self.saved["last"]
        )


def _block_kinds(layers: int, dual: int) -> list[str]:
    return ["last" if i == layers - 1 else "dual" if i < dual else "plain" for i in range(layers)]


def reduced_transformer(layers: int, dual: int, dtype: torch.dtype, grid: int = 384) -> torch.nn.Module:
    """A full-width SD3.5-M transformer of ``layers`` blocks on the CPU, in ``dtype``, with random
    weights (only the shapes matter): built on meta and filled, to skip the slow default init. Its
    position table is cropped to the ``grid`` of patches measured (the forward crops it anyway)."""
    model = architectures.sd35_medium_transformer(
        "meta", num_layers=layers, dual_attention_layers=tuple(range(dual)), pos_embed_max_size=grid
    )
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.uniform_(-0.02, 0.02)
    return model.requires_grad_(False)


def _add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: list[str]) -> None:
    """The policy adapter as the backbone adds it: peft, gaussian init, fp32, the only trainable part."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    model.add_adapter(config)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
        p.requires_grad_("lora_" in name)


def measure_activations(
    layers: int = REDUCED_LAYERS,
    image_tokens: int = (RESOLUTION // 16) ** 2,
    text_tokens: int = CLIP_TOKENS + 128,
    checkpointing: bool = True,
    precision: str = "fp16",
    *,
    lora: tuple[int, float, tuple[str, ...]] = (32, 64.0, architectures.SD35_JOINT_ATTENTION),
    dual: int = 1,
) -> Activations:
    """Bytes per sequence of ``image_tokens`` + ``text_tokens`` in a reduced-depth real SD3.5-M: one
    training forward + backward and one no-grad forward at batch 1 and at batch 2, the difference
    being one sequence's (what does not grow with the batch, e.g. autocast's half copies of the LoRA
    weights and the LoRA gradients, drops out; the plan counts it from the weights). fp16 and bf16
    are measured under bf16 autocast (the CPU's half type, same bytes). Gradient checkpointing is
    diffusers' own (non-reentrant), with the block it runs labelled so its saved inputs count there."""
    started = time.perf_counter()
    half = precision != "fp32"
    dtype = torch.bfloat16 if half else torch.float32
    torch.manual_seed(0)
    grid = round(math.sqrt(image_tokens))
    model = reduced_transformer(layers, dual, dtype, grid)
    rank, alpha, targets = lora
    _add_lora(model, rank, alpha, list(targets))
    kinds = dict(zip(map(id, model.transformer_blocks), _block_kinds(layers, dual), strict=True))
    saved = _SavedBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
    for block in model.transformer_blocks:
        block.register_forward_pre_hook(lambda module, _: setattr(saved, "label", kinds[id(module)]))
        block.register_forward_hook(lambda *_: setattr(saved, "label", "rest"))
    if checkpointing:

        def checkpoint(block, *args):  # diffusers' default function, with the block named first
            with saved.labelled(kinds[id(block)]):
                return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

        model.enable_gradient_checkpointing(checkpoint)
    model.train()
    config = model.config

    def run(batch: int) -> tuple[dict[str, int], int, int]:
        side = grid * config.patch_size
        x = torch.randn(batch, config.in_channels, side, side)
        text = torch.randn(batch, text_tokens, config.joint_attention_dim, dtype=dtype)
        pooled = torch.randn(batch, config.pooled_projection_dim, dtype=dtype)
        timestep = torch.full((batch,), 500.0)

        def forward() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
                out = model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep)
            return out.sample.float()

        saved.reset()
        live = _LiveBytes()
        with live, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
            loss = forward().pow(2).mean()
            after_forward = live.restart_peak()
            loss.backward()
            backward = live.peak - after_forward
        del loss
        model.zero_grad(set_to_none=True)
        inference = _LiveBytes()
        with torch.no_grad(), inference:
            forward()
        return dict(saved.by_label), backward, inference.peak

    (saved_1, backward_1, inference_1), (saved_2, backward_2, inference_2) = run(1), run(2)
    slope = {label: saved_2.get(label, 0) - saved_1.get(label, 0) for label in saved_2}
    per_block = {kind: _per_kind(slope, kinds, kind) for kind in ("dual", "plain", "last")}
    return Activations(
        saved={"rest": float(slope.get("rest", 0)), **per_block},
        backward=float(max(backward_2 - backward_1, 0)),  # tiny inputs: noise around 0
        inference=float(inference_2 - inference_1),
        layers=layers,
        seconds=time.perf_counter() - started,
    )


def _per_kind(by_label: dict[str, int], kinds: dict[int, str], kind: str) -> float:
    count = sum(k == kind for k in kinds.values())
    return by_label.get(kind, 0) / count if count else 0.0


def measure_decode(latent_side: int = 32) -> float:
    """Peak live bytes of SD3.5-M's VAE decoding one image, fp32 and no grad, measured at
    ``latent_side`` and scaled by pixels to 512 px: every activation of the decoder is a feature map
    (the mid-block attention runs memory-efficient on GPUs, linear in pixels too)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**SD35_VAE)
    vae = vae.to_empty(device="cpu").requires_grad_(False)
    with torch.no_grad():
        for tensor in [*vae.parameters(), *vae.buffers()]:
            tensor.uniform_(-0.02, 0.02)
    z = torch.randn(1, SD35_VAE["latent_channels"], latent_side, latent_side)
    live = _LiveBytes()
    with torch.no_grad(), live:
        vae.decode(z)
    return live.peak * ((RESOLUTION // 8) / latent_side) ** 2


@dataclass(frozen=True)
class Measured:
    activations: Activations
    decode_per_image: float  # bytes, at 512 px


def measure(model: Any, use_cache: bool = False, quiet: bool = False) -> Measured:
    """What the plan of ``model`` (a ModelConfig) needs measured, at the paper's token count;
    ``use_cache``: reuse an earlier measurement of the same settings (`make plan` refreshes it)."""
    lora = (
        model.lora_rank,
        model.lora_alpha,
        tuple(model.lora_targets or architectures.SD35_JOINT_ATTENTION),
    )
    key = json.dumps(
        [REDUCED_LAYERS, CLIP_TOKENS + model.t5_max_length, model.gradient_checkpointing, model.precision]
        + [lora, torch.__version__, _diffusers_version()]
    )
    cache = CACHE.expanduser()
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    if use_cache and key in stored:
        entry = stored[key]
        return Measured(Activations(**entry["activations"]), entry["decode_per_image"])
    if not quiet:
        print(
            f"measuring activations: a {REDUCED_LAYERS}-block full-width SD3.5-M on the CPU "
            f"(checkpointing={model.gradient_checkpointing}, {model.precision}) and the VAE decoder ...",
            flush=True,
        )
    activations = measure_activations(
        text_tokens=CLIP_TOKENS + model.t5_max_length,
        checkpointing=model.gradient_checkpointing,
        precision=model.precision,
        lora=lora,
    )
    measured = Measured(activations, measure_decode())
    stored[key] = {
        "activations": dataclasses.asdict(activations),
        "decode_per_image": measured.decode_per_image,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(stored, indent=1))  # several processes may write at once
    return measured


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


# ------------------------------------------------------------------------------------------------
# Counting weights on the meta device
# ------------------------------------------------------------------------------------------------


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.cache
def transformer_parameters() -> int:
    return _numel(architectures.sd35_medium_transformer("meta"))


@functools.cache
def lora_parameters(rank: int, alpha: float, targets: tuple[str, ...]) -> int:
    model = architectures.sd35_medium_transformer("meta")
    return architectures.count_lora(
        model, list(targets or architectures.SD35_JOINT_ATTENTION), rank, alpha
    ).parameters


@functools.cache
def vae_parameters() -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return _numel(AutoencoderKL(**SD35_VAE))


@functools.cache
def aesthetic_parameters() -> int:
    """CLIP ViT-L/14 (both towers: the reward loads the whole CLIPModel) and the LAION head."""
    from transformers import CLIPConfig, CLIPModel

    from reward_models.laion_aesthetic import AestheticHead

    config = CLIPConfig(text_config=CLIP_VIT_L_TEXT, vision_config=CLIP_VIT_L_VISION, projection_dim=768)
    with torch.device("meta"):
        return _numel(CLIPModel(config)) + _numel(AestheticHead(768))


@functools.cache
def text_encoder_parameters() -> dict[str, int]:
    """SD3.5-M's CLIP-L and CLIP-G text encoders (with projections) and T5-XXL's encoder."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        return {
            "CLIP-L": _numel(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_VIT_L_TEXT))),
            "CLIP-G": _numel(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT))),
            "T5-XXL": _numel(T5EncoderModel(T5Config(**T5_XXL))),
        }


def reward_parameters(names: list[str]) -> int:
    """GPU-resident reward weights: the aesthetic predictor's; GenEval scores on a remote server."""
    return aesthetic_parameters() if "aesthetic" in names else 0


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    gib: float
    counts: str


@dataclass(frozen=True)
class Plan:
    """Resident weights, and per phase its transient on top of them; the peak is the largest phase."""

    weights: list[Row]
    phases: list[Row]  # transients (the load phase: its whole footprint)
    totals: dict[str, float]  # phase -> GiB at its peak
    settings: dict[str, Any]  # the knobs' values, for messages

    @property
    def resident(self) -> float:
        return sum(row.gib for row in self.weights)

    @property
    def peak_phase(self) -> str:
        return max(self.totals, key=self.totals.__getitem__)

    @property
    def peak(self) -> float:
        return self.totals[self.peak_phase]


def plan(settings: RunConfig, measured: Measured) -> Plan:
    """The per-GPU plan of one resolved run config (a branching zeroth-order arm on SD3.5-M)."""
    model, arm = settings.model, settings.arm
    missing = [k for k in ("microbatch_rows", "chunk", "decode_chunk", "eval_batch") if k not in arm]
    if model.backbone != "sd35" or missing:
        raise ConfigError(
            f"the memory plan covers SD3.5-M runs of the branching arm; this run has model.backbone="
            f"{model.backbone} and its arm lacks {missing or 'nothing'}"
        )
    half = 2 if model.precision != "fp32" and model.half_frozen_weights else 4  # frozen weights' bytes
    act = measured.activations
    frozen = transformer_parameters()
    lora = lora_parameters(model.lora_rank, model.lora_alpha, tuple(model.lora_targets))
    vae = vae_parameters()
    rewards = [settings.reward, *settings.eval_extra]
    reward = reward_parameters(rewards)
    encoders = text_encoder_parameters()
    weights = [
        Row(
            "frozen transformer",
            frozen * half / GIB,
            f"{frozen:,} params x {half} B ({model.precision if half == 2 else 'fp32'})",
        ),
        Row("LoRA state", lora * 20 / GIB, f"{lora:,} params x 20 B (fp32 weight, grad, 2 AdamW, EMA)"),
        Row("VAE", vae * 4 / GIB, f"{vae:,} params x 4 B (fp32)"),
        Row(
            "reward",
            reward * 4 / GIB,
            f"{reward:,} params x 4 B (CLIP ViT-L/14 + LAION head, fp32)"
            if reward
            else f"{', '.join(rewards)}: remote server, no GPU weights",
        ),
        Row("CUDA context", CUDA_CONTEXT_GIB, "assumed, not measured: context and allocator slack"),
    ]
    full = architectures.SD35_MEDIUM_TRANSFORMER
    layers, dual = full["num_layers"], len(full["dual_attention_layers"])
    per_sequence = act.saved_for(layers, dual)
    rows, chunk, decode, evals = (arm[k] for k in ("microbatch_rows", "chunk", "decode_chunk", "eval_batch"))
    encoder_params = sum(encoders.values())
    load = (frozen * half + encoder_params * half + vae * 4 + lora * 4) / GIB + CUDA_CONTEXT_GIB
    names = ", ".join(f"{k} {v / 1e6:,.0f}M" for k, v in encoders.items())
    checkpointed = "checkpointed" if model.gradient_checkpointing else "no checkpointing"
    sequences = 2 * rows
    casts = lora * 2 / GIB if half == 2 else 0.0  # autocast's half copies of the LoRA weights, per call
    training = sequences * (per_sequence + max(act.backward, act.inference)) / GIB + casts
    # reward workers score while sampling goes on; at most 2 x workers + 1 chunks of images wait
    # (rsm_core.scoring.ScoreQueue): fp32 RGB at the model's resolution
    workers = arm.get("reward_workers", 0)
    held, image = (2 * workers + 1) * decode if workers else 0, 3 * RESOLUTION**2 * 4
    phases = [
        Row("load", load, f"transformer + VAE + LoRA weights + text encoders ({names}, {model.precision})"),
        Row(
            "rollout",
            2 * chunk * act.inference / GIB + casts + held * image / GIB,
            f"{chunk} rows x 2 (CFG) x {act.inference / 2**20:,.0f} MiB peak of a no-grad forward"
            + (f" + {held} decoded images awaiting the reward workers" if held else ""),
        ),
        Row(
            "decode",
            decode * measured.decode_per_image / GIB,
            f"{decode} images x {measured.decode_per_image / 2**20:,.0f} MiB peak of a 512 px VAE decode",
        ),
        Row(
            "training",
            training,
            f"{rows} rows x 2 (CFG) x ({per_sequence / 2**20:,.0f} MiB saved, {checkpointed}, + "
            f"{max(act.backward, act.inference) / 2**20:,.0f} MiB backward/reference transient)"
            " + LoRA half copies",
        ),
        Row(
            "evaluation",
            2 * evals * act.inference / GIB + casts,
            f"{evals} images x 2 (CFG) x {act.inference / 2**20:,.0f} MiB peak of a no-grad forward",
        ),
    ]
    resident = sum(row.gib for row in weights)
    totals = {row.name: row.gib if row.name == "load" else resident + row.gib for row in phases}
    knobs = {
        "rollout": chunk,
        "decode": decode,
        "training": rows,
        "evaluation": evals,
        "load": model.precision,
    }
    return Plan(weights, phases, totals, knobs)


def check_fits(plan: Plan, gpu_memory_gb: float, where: str = "") -> None:
    """Refuse a run whose planned peak exceeds the GPU's memory, naming the setting to turn down."""
    if plan.peak <= gpu_memory_gb:
        return
    phase = plan.peak_phase
    knob, what = KNOBS[phase]
    raise ConfigError(
        f"{where}the memory plan's peak is {plan.peak:.1f} GiB per GPU in the {phase} phase, over "
        f"run.gpu_memory_gb={gpu_memory_gb:g}; lower {knob} (now {plan.settings[phase]}; "
        f"{what}), or use "
        f"GPUs with more memory (SCALE=paper) and set run.gpu_memory_gb to their size "
        f"(`make plan` shows every phase)"
    )


def table(plan: Plan, gpu_memory_gb: float) -> str:
    lines = ["| weights (resident) | GiB | what it counts |", "|---|---:|---|"]
    lines += [f"| {row.name} | {row.gib:.2f} | {row.counts} |" for row in plan.weights]
    lines += [f"| **resident** | **{plan.resident:.2f}** | |", ""]
    lines += ["| phase | transient GiB | peak GiB | what the transient counts |", "|---|---:|---:|---|"]
    for row in plan.phases:
        transient = "-" if row.name == "load" else f"{row.gib:.2f}"
        lines.append(f"| {row.name} | {transient} | {plan.totals[row.name]:.2f} | {row.counts} |")
    verdict = "fits" if plan.peak <= gpu_memory_gb else "DOES NOT FIT"
    lines += [
        "",
        f"Peak {plan.peak:.2f} GiB ({plan.peak_phase}) vs gpu_memory_gb {gpu_memory_gb:g}: {verdict}.",
    ]
    return "\n".join(lines)


def figure_plans(
    figure: str, scale: str, overrides: list[str], use_cache: bool = False, quiet: bool = False
) -> dict[str, tuple[RunConfig, Plan]]:
    """Each arm's resolved run config and plan (the arms share the measurement)."""
    from experiments.embeddings import FIGURES

    file = CONFIGS / figure / f"{scale}.yaml"
    if not file.is_file():
        scales = sorted(p.stem for p in file.parent.glob("*.yaml"))
        raise ConfigError(
            f"{figure} has no {scale} config ({file} does not exist; its scales are {scales}), so there is "
            f"no {scale} run to plan; `make plan SCALE=paper FIG={figure}` shows the per-GPU need of its "
            f"paper run"
        )
    cfg = load_config(SweepConfig, file, overrides=overrides)
    resolved = {arm: sections(arm_config(cfg, items, seed=0)).run for arm, items in FIGURES[figure].items()}
    models = {json.dumps(dataclasses.asdict(s.model), sort_keys=True) for s in resolved.values()}
    if len(models) != 1:
        raise ConfigError(f"the arms of {figure} differ in their model settings; plan them one by one")
    first = next(iter(resolved.values()))
    if first.model.backbone != "sd35":
        raise ConfigError(f"{figure} at scale {scale} runs {first.model.backbone}; the plan is for SD3.5-M")
    measured = measure(first.model, use_cache=use_cache, quiet=quiet)
    return {arm: (s, plan(s, measured)) for arm, s in resolved.items()}


def check_runs(runs: dict[str, RunConfig]) -> None:
    """A GPU sweep's start-up check: every SD3.5-M run's plan fits its run.gpu_memory_gb (measured
    once, or read from the cache `make plan` writes)."""
    for name, settings in runs.items():
        if settings.model.backbone == "sd35":
            measured = measure(settings.model, use_cache=True)
            check_fits(plan(settings, measured), settings.gpu_memory_gb, where=f"run {name}: ")


def main(argv: list[str] | None = None) -> None:
    from experiments.embeddings import paper_parser

    parser = paper_parser(__doc__)
    parser.add_argument("--out", type=Path, default=TABLES, help="where plan_<figure>_<scale>.md goes")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    plans = figure_plans(args.figure, args.scale, args.set)
    settings, worst = max(plans.values(), key=lambda item: item[1].peak)
    act = measure(settings.model, use_cache=True, quiet=True).activations
    worst_arm = next(arm for arm, item in plans.items() if item[1] is worst)
    lines = [
        f"# Per-GPU memory plan: {args.figure}, scale {args.scale}",
        "",
        "Per arm (peak GiB): " + "; ".join(f"{arm} {p.peak:.2f}" for arm, (_, p) in plans.items()),
        f"Largest: {worst_arm} (arm settings {worst.settings}).",
        "",
        table(worst, settings.gpu_memory_gb),
        "",
        f"Measured on a {act.layers}-block full-width copy (CPU, bf16 autocast), per "
        f"sequence of {(RESOLUTION // 16) ** 2} + {CLIP_TOKENS + settings.model.t5_max_length} tokens: saved "
        + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in act.saved.items())
        + f"; backward transient {act.backward / 2**20:,.1f} MiB; no-grad forward peak "
        f"{act.inference / 2**20:,.1f} MiB. Rows are upper bounds where a microbatch's rows share states.",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"plan_{args.figure}_{args.scale}.md"
    atomic_write_text(path, text + "\n")
    print(f"\nwritten to {path} in {time.perf_counter() - started:.0f} s (measuring: {act.seconds:.0f} s)")


if __name__ == "__main__":
    run_cli(main)
