"""Per-GPU memory plan of a paper-scale run (`make plan SCALE=paper|1gpu FIG=fig3|fig_zo_flow|fig5|fig6`).

A paper run that does not fit its GPU fails hours in, after loading and embedding; the plan says
before launch. It adds up what experiments/footprints.py counts and measures (weights on the meta
device, activations on the CPU at reduced size) for the run's phases:

- zeroth-order branching arms (Figure 3, GenEval): load, rollout, decode, training, evaluation;
- first-order arms (Figures 5, 6): load; collection (no-grad sampling of a collection batch, whose
  states go to host memory); reward (decoding and scoring it, and the terminal estimator's reward
  gradient); training (a microbatch's forward with grad through the denoiser, both CFG halves, while
  the reference forward, the reward-gradient pass and the backward run one after another on top:
  the Tweedie estimator decodes and differentiates the reward, the lookahead estimator also runs the
  denoiser with grad at the next state); evaluation.

    python -m experiments.plan --figure fig5 --scale paper

A sweep on GPUs refuses to start when a run's plan exceeds ``run.gpu_memory_gb`` (``check_fits``),
naming the setting to turn down.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments import footprints as fp
from experiments.cli import run as run_cli
from experiments.run import PAPER_BACKBONES, RunConfig, trainable_method
from rsm_core.backbones import architectures
from rsm_core.backbones.stable_diffusion import SD35
from rsm_core.config import ConfigError
from rsm_core.records import atomic_write_text

GIB = 2**30
CONFIGS = Path(__file__).parent / "configs"
TABLES = Path("results/tables")
CACHE = Path("~/.cache/rsm_bench/plan-measurements.json")
# An assumption, not measured: what the CUDA context and the caching allocator's slack take before
# any tensor (a few hundred MiB on current drivers).
CUDA_CONTEXT_GIB = 0.5
MEMORY_CACHE_PROMPTS = SD35.memory_cache_prompts  # prompt conditionings a paper backbone keeps on the GPU

# What to turn down when a phase does not fit (the phase's own knob first).
KNOBS = {
    "load": ("run.model.precision", "fp16 keeps the text encoders in half precision"),
    "rollout": ("run.arm.chunk", "rows per rollout model call"),
    "decode": ("run.arm.decode_chunk", "images per VAE decode"),
    "collection": ("run.arm.collection_batch", "trajectories per sampling call"),
    "reward": ("run.arm.decode_chunk", "images per decode and reward gradient"),
    "training": ("run.arm.microbatch_rows", "rows per training microbatch"),
    "evaluation": ("run.arm.eval_batch", "test images per sampling call"),
}


# ------------------------------------------------------------------------------------------------
# Measurements of one run's networks (cached)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """Per-item bytes of a run's networks at its resolution (see experiments.footprints)."""

    backbone: fp.Footprint  # one sequence of a denoiser call (a row's conditional or unconditional half)
    decode: fp.Footprint  # one image through the run's decoder
    reward: fp.Footprint | None  # one image through the reward's vision tower (None: not measured)
    detail: str  # how the backbone was measured, for the table's footnote


def decoder_name(model: Any) -> str:
    """The run's image decoder in architectures.DECODERS."""
    return "taesd3" if model.decoder == "taesd3" else f"{model.backbone}-vae"


def _lora(model: Any) -> fp.Lora:
    return (model.lora_rank, model.lora_alpha, tuple(model.lora_targets))


def text_tokens(model: Any) -> int:
    """Tokens of a prompt's conditioning: CLIP's 77, then (SD3.5-M) T5's ``t5_max_length``."""
    return fp.CLIP_TOKENS + (model.t5_max_length if model.backbone == "sd35" else 0)


def measure_backbone(model: Any) -> tuple[fp.Footprint, str]:
    """The denoiser's per-sequence footprint at the run's resolution, and how it was measured."""
    if model.backbone == "sd15":
        footprint = fp.measure_unet(
            model.resolution, _lora(model), model.precision, model.gradient_checkpointing
        )
        return footprint, (
            f"SD1.5 UNet measured whole on {fp.MEASURED_SIDE}x{fp.MEASURED_SIDE} latents (CPU, "
            f"{'bf16 autocast' if model.precision != 'fp32' else 'fp32'}), scaled by pixels to "
            f"{model.resolution} px"
        )
    lora = _lora(model)
    act = fp.measure_activations(
        image_tokens=(model.resolution // 16) ** 2,
        text_tokens=text_tokens(model),
        checkpointing=model.gradient_checkpointing,
        precision=model.precision,
        lora=(lora[0], lora[1], lora[2] or architectures.SD35_JOINT_ATTENTION),
    )
    per_block = ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in act.saved.items())
    return act.full_depth(), (
        f"SD3.5-M measured on a {act.layers}-block full-width copy (CPU, bf16 autocast) per sequence of "
        f"{(model.resolution // 16) ** 2} + {text_tokens(model)} tokens: saved {per_block}"
    )


def _needs_reward_gradient(settings: RunConfig) -> bool:
    return trainable_method(settings.method).arm == "fo_trajectory"


def _reward_vision(settings: RunConfig) -> dict | None:
    """The vision tower a first-order run differentiates its reward through (None: none measured)."""
    return fp.REWARD_VISION.get(settings.reward) if _needs_reward_gradient(settings) else None


def measurement_key(settings: RunConfig) -> str:
    """Everything a run's measurement depends on: runs with equal keys share one."""
    model = settings.model
    return json.dumps(
        [model.backbone, model.resolution, text_tokens(model), model.gradient_checkpointing, model.precision]
        + [_lora(model), decoder_name(model), _reward_vision(settings), fp.REDUCED_LAYERS, fp.MEASURED_SIDE]
        + [torch.__version__, _diffusers_version()],
        sort_keys=True,
    )


def measure(settings: RunConfig, use_cache: bool = False, quiet: bool = False) -> Measured:
    """What the plan of ``settings`` needs measured; ``use_cache``: reuse an earlier measurement of
    the same settings (`make plan` refreshes it)."""
    model, vision, key = settings.model, _reward_vision(settings), measurement_key(settings)
    cache = CACHE.expanduser()
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    if use_cache and key in stored:
        entry = stored[key]
        reward = fp.Footprint(**entry["reward"]) if entry["reward"] else None
        return Measured(
            fp.Footprint(**entry["backbone"]), fp.Footprint(**entry["decode"]), reward, entry["detail"]
        )
    if not quiet:
        print(
            f"measuring activations of {model.backbone} at {model.resolution} px, its decoder "
            f"{decoder_name(model)}{' and the reward' if vision else ''} on the CPU ...",
            flush=True,
        )
    backbone, detail = measure_backbone(model)
    decode = fp.measure_decoder(decoder_name(model), model.resolution)
    reward = fp.measure_clip_vision(vision) if vision else None
    measured = Measured(backbone, decode, reward, detail)
    stored[key] = {
        "backbone": dataclasses.asdict(backbone),
        "decode": dataclasses.asdict(decode),
        "reward": dataclasses.asdict(reward) if reward else None,
        "detail": detail,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(stored, indent=1))  # several processes may write at once
    return measured


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


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
    host: Row | None = None  # CPU memory the run keeps besides (the first-order arms' trajectories)
    knob_names: dict[str, str] = field(default_factory=dict)  # phase -> the arm kind's own setting

    @property
    def resident(self) -> float:
        return sum(row.gib for row in self.weights)

    @property
    def peak_phase(self) -> str:
        return max(self.totals, key=self.totals.__getitem__)

    @property
    def peak(self) -> float:
        return self.totals[self.peak_phase]


def _half_bytes(model: Any) -> int:
    """Bytes per frozen weight (and per cached embedding element)."""
    return 2 if model.precision != "fp32" and model.half_frozen_weights else 4


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


@dataclass(frozen=True)
class _Weights:
    """The resident rows and the counts the phases reuse."""

    rows: list[Row]
    lora: int  # LoRA parameters
    load: Row  # the load phase: denoiser, text encoders, decoder, LoRA

    @property
    def casts(self) -> float:
        """GiB of autocast's half copies of the LoRA weights during a model call."""
        return self.lora * 2 / GIB


def weights(settings: RunConfig) -> _Weights:
    """What stays on the GPU through training: the frozen denoiser, the LoRA state, the decoder, the
    rewards, the prompt conditionings kept in memory, the CUDA context (the text encoders are freed
    once every prompt is embedded on disk; the load phase holds them)."""
    model, loop = settings.model, settings.loop
    half = _half_bytes(model)
    denoiser = fp.denoiser_parameters(model.backbone)
    name = "transformer" if model.backbone == "sd35" else "UNet"
    lora = fp.lora_parameters(model.backbone, model.lora_rank, model.lora_alpha, tuple(model.lora_targets))
    lora_bytes = 16 + 4 * loop.ema
    decoder = fp.decoder_parameters(decoder_name(model))
    rewards = list(dict.fromkeys([settings.reward, *settings.eval_extra]))
    reward = sum(fp.reward_parameters(r) for r in rewards)
    width = 4096 if model.backbone == "sd35" else 768  # T5-XXL's (CLIP's zero-padded to it) or CLIP-L's
    pooled = 2048 if model.backbone == "sd35" else 768
    embeddings = MEMORY_CACHE_PROMPTS * (text_tokens(model) * width + pooled) * half
    precision = model.precision if half == 2 else "fp32"
    rows = [
        Row(f"frozen {name}", denoiser * half / GIB, f"{denoiser:,} params x {half} B ({precision})"),
        Row(
            "LoRA state",
            lora * lora_bytes / GIB,
            f"{lora:,} params x {lora_bytes} B (fp32 weight, grad, 2 AdamW{', EMA' if loop.ema else ''})",
        ),
        Row(decoder_name(model), decoder * 4 / GIB, f"{decoder:,} params x 4 B (fp32)"),
        Row(
            "reward",
            reward * 4 / GIB,
            f"{reward:,} params x 4 B ({', '.join(rewards)}, fp32)"
            if reward
            else f"{', '.join(rewards)}: no GPU weights",
        ),
        Row(
            "prompt embeddings",
            embeddings / GIB,
            f"{MEMORY_CACHE_PROMPTS} prompts x {text_tokens(model)} tokens x {width} x {half} B on the GPU",
        ),
        Row("CUDA context", CUDA_CONTEXT_GIB, "assumed, not measured: context and allocator slack"),
    ]
    encoders = fp.text_encoder_parameters(model.backbone)
    names = ", ".join(f"{k} {v / 1e6:,.0f}M" for k, v in encoders.items())
    load = (denoiser * half + sum(encoders.values()) * half + decoder * 4 + lora * 4) / GIB + CUDA_CONTEXT_GIB
    what = f"{name} + {decoder_name(model)} + LoRA weights + text encoders ({names}, {precision})"
    return _Weights(rows, lora, Row("load", load, what))


def _finish(weights: _Weights, phases: list[Row], knobs: dict[str, Any], host: Row | None = None) -> Plan:
    resident = sum(row.gib for row in weights.rows)
    totals = {row.name: row.gib if row.name == "load" else resident + row.gib for row in phases}
    return Plan(weights.rows, phases, totals, knobs, host)


def plan(settings: RunConfig, measured: Measured) -> Plan:
    """The per-GPU plan of one resolved run config (a paper backbone; the arm kind of its method)."""
    if settings.model.backbone not in PAPER_BACKBONES:
        raise ConfigError(
            f"the memory plan covers the paper backbones {PAPER_BACKBONES}; this run has model.backbone="
            f"{settings.model.backbone}"
        )
    kind = trainable_method(settings.method).arm
    if kind == "fo_trajectory":
        return first_order_plan(settings, measured)
    if kind in ZEROTH_ORDER_KNOBS:
        return zeroth_order_plan(settings, measured)
    raise ConfigError(f"the memory plan has no model of the {kind} arm kind ({settings.method})")


# each zeroth-order arm kind's names of (rows per rollout model call, rows per training microbatch)
ZEROTH_ORDER_KNOBS = {
    "zo_branch": ("chunk", "microbatch_rows"),
    "zo_trajectory": ("sample_batch", "train_batch"),
}


def zeroth_order_plan(settings: RunConfig, measured: Measured) -> Plan:
    """A zeroth-order arm (branching or whole trajectories) on a paper backbone: rollout calls,
    decodes, training microbatches, evaluation."""
    model, arm = settings.model, settings.arm
    resident = weights(settings)
    b = measured.backbone
    checkpointed = "checkpointed" if model.gradient_checkpointing else "no checkpointing"
    rollout, training_rows = ZEROTH_ORDER_KNOBS[trainable_method(settings.method).arm]
    rows, chunk, decode, evals = (arm[k] for k in (training_rows, rollout, "decode_chunk", "eval_batch"))
    sequences = 2 * rows
    casts = resident.casts if _half_bytes(model) == 2 else 0.0
    training = sequences * (b.saved + max(b.backward, b.inference)) / GIB + casts
    # reward workers score while sampling goes on; at most 2 x workers + 1 chunks of images wait
    # (rsm_core.scoring.ScoreQueue): fp32 RGB at the model's resolution
    workers = arm.get("reward_workers", 0)
    held, image = (2 * workers + 1) * decode if workers else 0, 3 * model.resolution**2 * 4
    phases = [
        resident.load,
        Row(
            "rollout",
            2 * chunk * b.inference / GIB + casts + held * image / GIB,
            f"{chunk} rows x 2 (CFG) x {_mib(b.inference)} peak of a no-grad forward"
            + (f" + {held} decoded images awaiting the reward workers" if held else ""),
        ),
        Row(
            "decode",
            decode * measured.decode.inference / GIB,
            f"{decode} images x {_mib(measured.decode.inference)} peak of a {model.resolution} px decode",
        ),
        Row(
            "training",
            training,
            f"{rows} rows x 2 (CFG) x ({_mib(b.saved)} saved, {checkpointed}, + "
            f"{_mib(max(b.backward, b.inference))} backward/reference transient) + LoRA half copies",
        ),
        Row(
            "evaluation",
            2 * evals * b.inference / GIB + casts,
            f"{evals} images x 2 (CFG) x {_mib(b.inference)} peak of a no-grad forward",
        ),
    ]
    knobs = {
        "rollout": chunk,
        "decode": decode,
        "training": rows,
        "evaluation": evals,
        "load": model.precision,
    }
    names = {"rollout": f"run.arm.{rollout}", "training": f"run.arm.{training_rows}"}
    return dataclasses.replace(_finish(resident, phases, knobs), knob_names=names)


def first_order_plan(settings: RunConfig, measured: Measured) -> Plan:
    """A first-order trajectory arm (rsm_core.arms.fo_trajectory) on SD3.5-M or SD1.5."""
    model, arm = settings.model, settings.arm
    resident = weights(settings)
    b, d = measured.backbone, measured.decode
    r = measured.reward or fp.Footprint(0.0, 0.0, 0.0)
    rows, collect, decode, evals = (
        arm[k] for k in ("microbatch_rows", "collection_batch", "decode_chunk", "eval_batch")
    )
    estimator, image = arm["estimator"], 3 * model.resolution**2 * 4
    casts = resident.casts if _half_bytes(model) == 2 else 0.0
    reward_note = "" if measured.reward else f" ({settings.reward}: reward activations not measured)"

    def scoring(n: int) -> float:
        """n images decoded and scored without grad (the decoded images held while the reward runs)."""
        return n * (max(d.inference, image + r.inference))

    def reward_gradient(n: int) -> float:
        """n images: decode and reward with grad, then the backward to the latents."""
        return n * (d.saved + r.saved + max(d.backward, r.backward))

    collection_reward = max(scoring(decode), reward_gradient(decode) if estimator == "terminal" else 0.0)
    sequences, chunk = 2 * rows, min(decode, rows)
    through_policy = reward_gradient(chunk) + 2 * chunk * (b.saved + b.backward)
    signal = {
        "tweedie": reward_gradient(chunk),
        "terminal": 0.0,
        "lookahead": through_policy,
        "none": through_policy,  # SQDF: the reward of x' through the frozen reference's Tweedie map
    }[estimator]
    kept, aux_text = auxiliary_saved(arm["auxiliary"], rows)
    if arm["auxiliary"] != "none":  # its reward gradients through the policy, one at a time
        signal = max(signal, through_policy)
    transient = max(sequences * b.inference, signal, (sequences + kept) * b.backward)
    through_text = (
        f"{chunk} row(s) x 2 (CFG) x {_mib(b.saved)} denoiser saved + {chunk} image(s) x "
        f"({_mib(d.saved)} decoder + {_mib(r.saved)} reward saved)"
    )
    signal_text = {
        "tweedie": f"{chunk} image(s) x ({_mib(d.saved)} decoder + {_mib(r.saved)} reward saved)",
        "terminal": "none: the terminal gradients come from collection",
        "lookahead": through_text,
        "none": through_text,
    }[estimator]
    phases = [
        resident.load,
        Row(
            "collection",
            2 * collect * b.inference / GIB + casts,
            f"{collect} trajectories x 2 (CFG) x {_mib(b.inference)} peak of a no-grad forward",
        ),
        Row(
            "reward",
            collection_reward / GIB,
            f"{decode} image(s): no-grad decode and score ({_mib(d.inference)} decode, {_mib(r.inference)} "
            "reward peak)"
            + (f", then with grad ({_mib(d.saved + r.saved)} saved each)" if estimator == "terminal" else "")
            + reward_note,
        ),
        Row(
            "training",
            ((sequences + kept) * b.saved + transient) / GIB + casts,
            f"{rows} row(s) x 2 (CFG) x {_mib(b.saved)} saved{aux_text}, then the largest of the "
            f"reference forward ({_mib(sequences * b.inference)}), the {estimator} reward gradient "
            f"({signal_text}) and the backward ({_mib(sequences * b.backward)})",
        ),
        Row(
            "evaluation",
            max(2 * evals * b.inference, scoring(decode)) / GIB + casts,
            f"{evals} images x 2 (CFG) x {_mib(b.inference)} peak of a no-grad forward (policy, then "
            f"reference), or scoring {decode} image(s)",
        ),
    ]
    knobs = {
        "collection": collect,
        "reward": decode,
        "training": rows,
        "evaluation": evals,
        "load": model.precision,
    }
    return _finish(resident, phases, knobs, trajectory_store(settings))


def auxiliary_saved(kind: str, rows: int) -> tuple[int, str]:
    """Extra backbone sequences whose activations the unpruned losses keep until the backward: the
    value network's three unguided forwards and the reference's guided forward differentiated in its
    input (VGG-Flow's consistency loss); nabla-GFN's residual UNet is small beside the backbone."""
    if kind != "value_adapter":
        return 0, ""
    extra = 3 * rows + 2 * rows
    return extra, f" + {extra} value-net / reference sequence(s) kept for the consistency loss"


def trajectory_store(settings: RunConfig) -> Row:
    """Host memory of an epoch's trajectories (the first-order arm keeps them on the CPU): per
    trajectory every state, every sampling output, the DDPM noise, the terminal reward gradient."""
    model, arm = settings.model, settings.arm
    steps, side = arm["sampler_steps"], model.resolution // 8
    kept = {"states": steps + 1, "outputs": steps}
    kept |= {"noise": steps} if arm["sampler"] == "ddpm" else {}
    kept |= {"terminal gradient": 1} if arm["estimator"] == "terminal" else {}
    latent = 4 * (16 if model.backbone == "sd35" else 4) * side**2
    count, per_trajectory = settings.shards * arm["trajectories_per_epoch"], sum(kept.values())
    return Row(
        "host memory",
        count * per_trajectory * latent / GIB,
        f"{count} trajectories x {per_trajectory} latents ({', '.join(kept)}) x "
        f"{latent / 2**10:,.0f} KiB fp32, on the CPU",
    )


def check_fits(plan: Plan, gpu_memory_gb: float, where: str = "") -> None:
    """Refuse a run whose planned peak exceeds the GPU's memory, naming the setting to turn down."""
    if plan.peak <= gpu_memory_gb:
        return
    phase = plan.peak_phase
    knob, what = KNOBS[phase]
    knob = plan.knob_names.get(phase, knob)
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
    if plan.host is not None:
        lines.append(f"Besides, {plan.host.gib:.2f} GiB of {plan.host.name}: {plan.host.counts}.")
    return "\n".join(lines)


def summary(plans: dict[str, tuple[RunConfig, Plan]]) -> str:
    """One line per arm: the peak GiB of each phase, the budget and the verdict."""
    phases = list(dict.fromkeys(name for _, p in plans.values() for name in p.totals))
    lines = [
        "| arm | " + " | ".join(phases) + " | peak | gpu_memory_gb | |",
        "|---|" + "---:|" * (len(phases) + 2) + "---|",
    ]
    for arm, (settings, p) in plans.items():
        cells = [f"{p.totals[name]:.1f}" if name in p.totals else "" for name in phases]
        verdict = "fits" if p.peak <= settings.gpu_memory_gb else "DOES NOT FIT"
        lines.append(
            f"| {arm} | " + " | ".join(cells) + f" | {p.peak:.1f} | {settings.gpu_memory_gb:g} | {verdict} |"
        )
    return "\n".join(lines)


def figure_plans(
    figure: str, scale: str, overrides: list[str], use_cache: bool = False, quiet: bool = False
) -> dict[str, tuple[RunConfig, Plan]]:
    """Each arm's resolved run config and plan (arms with the same networks share the measurement)."""
    from experiments.embeddings import figure_runs

    file = CONFIGS / figure / f"{scale}.yaml"
    if not file.is_file():
        scales = sorted(p.stem for p in file.parent.glob("*.yaml"))
        raise ConfigError(
            f"{figure} has no {scale} config ({file} does not exist; its scales are {scales}), so there is "
            f"no {scale} run to plan; `make plan SCALE=paper FIG={figure}` shows the per-GPU need of its "
            f"paper run"
        )
    resolved = figure_runs(figure, scale, overrides)
    other = sorted({s.model.backbone for s in resolved.values()} - set(PAPER_BACKBONES))
    if other:
        raise ConfigError(f"{figure} at scale {scale} runs {other}; the plan is for {PAPER_BACKBONES}")
    measured: dict[str, Measured] = {}
    for s in resolved.values():
        key = measurement_key(s)
        if key not in measured:
            measured[key] = measure(s, use_cache=use_cache, quiet=quiet)
    return {arm: (s, plan(s, measured[measurement_key(s)])) for arm, s in resolved.items()}


def check_runs(runs: dict[str, RunConfig]) -> None:
    """A GPU sweep's start-up check: every paper-backbone run's plan fits its run.gpu_memory_gb
    (measured once, or read from the cache `make plan` writes)."""
    for name, settings in runs.items():
        if settings.model.backbone in PAPER_BACKBONES:
            measured = measure(settings, use_cache=True)
            check_fits(plan(settings, measured), settings.gpu_memory_gb, where=f"run {name}: ")


def main(argv: list[str] | None = None) -> None:
    from experiments.embeddings import paper_parser

    parser = paper_parser(__doc__)
    parser.add_argument("--out", type=Path, default=TABLES, help="where plan_<figure>_<scale>.md goes")
    parser.add_argument(
        "--use-cache", action="store_true", help=f"reuse earlier measurements of the same settings ({CACHE})"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    plans = figure_plans(args.figure, args.scale, args.set, use_cache=args.use_cache)
    lines = [f"# Per-GPU memory plan: {args.figure}, scale {args.scale}", "", summary(plans)]
    tables: dict[str, list[str]] = {}  # each distinct table once, with the arms it plans
    notes: dict[str, None] = {}
    for arm, (settings, arm_plan) in plans.items():
        tables.setdefault(table(arm_plan, settings.gpu_memory_gb), []).append(arm)
        notes[measure(settings, use_cache=True, quiet=True).detail] = None
    for text, arms in tables.items():
        settings, arm_plan = plans[arms[0]]
        lines += ["", f"## {', '.join(arms)} (arm settings {arm_plan.settings})", "", text]
    lines += ["", "Measured (bytes per sequence or image; see experiments/footprints.py):"]
    lines += [f"- {detail}." for detail in notes]
    lines += ["- Rows are upper bounds where a microbatch's rows share states."]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"plan_{args.figure}_{args.scale}.md"
    atomic_write_text(path, text + "\n")
    print(f"\nwritten to {path} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run_cli(main)
