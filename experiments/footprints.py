"""What the paper runs' networks occupy on a GPU: weights counted, activations measured on the CPU.

The memory plan (experiments/plan.py) adds these up for a run. Weights come from the published
configs built on the meta device (no weights, no memory). Activation bytes are measured, not guessed:
a network call runs at batch 1 and at batch 2 under two trackers, autograd's saved tensors (what a
training forward keeps for the backward) and the live tensor storages (the peak of a no-grad call,
and what a backward adds: a CPU stand-in for CUDA's max_memory_allocated). The difference between
the batches is one item's bytes (one sequence of a denoiser call, one image), free of what does not
grow with the batch. Networks too big or slow for the CPU are measured reduced where bytes add up:

- SD3.5-M's transformer at full width and real token count but reduced depth (per-block bytes add
  up over its 24 blocks);
- the SD1.5 UNet and the image decoders at a reduced side, scaled by pixels (their activations are
  feature maps; attention runs memory-efficient, linear in pixels too);
- a CLIP reward's vision tower at depths 1 and 2, extrapolated to its depth (per-layer bytes add up).

fp16 and bf16 are measured as bf16 (the CPU's half type, the same bytes).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from reward_models.hpsv2 import VIT_H_14
from rsm_core.backbones import architectures

REDUCED_LAYERS = 3  # blocks of the measured SD3.5-M copy: one MMDiT-X (dual attention), one plain, the last
MEASURED_SIDE = 32  # latent side of the UNet and decoder measurements (scaled by pixels to the run's)
CLIP_TOKENS = 77  # SD1.5's text sequence; SD3's is CLIP-L/G's 77, then T5's t5_max_length

# openai/clip-vit-large-patch14 (the aesthetic reward's CLIP, SD3.5-M's and SD1.5's CLIP-L text encoder)
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
# CLIP ViT-H-14 (laion2B-s32B-b79K: HPSv2.1's open_clip model, PickScore's fine-tune of it), as the
# HPSv2.1 reward builds it
CLIP_VIT_H_TEXT = {**VIT_H_14["text_config"], "projection_dim": VIT_H_14["projection_dim"]}
CLIP_VIT_H_VISION = {**VIT_H_14["vision_config"], "projection_dim": VIT_H_14["projection_dim"]}
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
# the vision tower each differentiable CLIP reward scores images with
REWARD_VISION = {"aesthetic": CLIP_VIT_L_VISION, "pickscore": CLIP_VIT_H_VISION, "hpsv2": CLIP_VIT_H_VISION}


# ------------------------------------------------------------------------------------------------
# Counting weights on the meta device
# ------------------------------------------------------------------------------------------------


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _denoiser(backbone: str) -> torch.nn.Module:
    if backbone == "sd15":
        return architectures.sd15_unet("meta")
    return architectures.sd35_medium_transformer("meta")


@functools.cache
def denoiser_parameters(backbone: str) -> int:
    """SD3.5-M's transformer ("sd35") or SD1.5's UNet ("sd15")."""
    return _numel(_denoiser(backbone))


@functools.cache
def lora_parameters(backbone: str, rank: int, alpha: float, targets: tuple[str, ...]) -> int:
    """The adapter's weights on ``targets`` (empty: the backbone's published list)."""
    default = (
        architectures.SD35_JOINT_ATTENTION if backbone == "sd35" else architectures.ATTENTION_PROJECTIONS
    )
    return architectures.count_lora(_denoiser(backbone), list(targets or default), rank, alpha).parameters


@functools.cache
def decoder_parameters(name: str) -> int:
    return _numel(architectures.image_decoder(name))


@functools.cache
def clip_parameters(text: tuple, vision: tuple, projection: int) -> int:
    """Both towers of a CLIPModel (the rewards load the whole model)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(text), vision_config=dict(vision), projection_dim=projection)
    with torch.device("meta"):
        return _numel(CLIPModel(config))


def _frozen(config: dict) -> tuple:
    return tuple(sorted(config.items()))


@functools.cache
def reward_parameters(name: str) -> int:
    """GPU-resident weights of a reward: CLIP ViT-L/14 and the LAION head, or CLIP ViT-H-14 (HPSv2.1,
    PickScore); 0 for the others (GenEval scores on a remote server, the tiny world's on the CPU)."""
    if name == "aesthetic":
        from reward_models.laion_aesthetic import AestheticHead

        with torch.device("meta"):
            head = _numel(AestheticHead(768))
        return clip_parameters(_frozen(CLIP_VIT_L_TEXT), _frozen(CLIP_VIT_L_VISION), 768) + head
    if name in ("hpsv2", "pickscore"):
        return clip_parameters(_frozen(CLIP_VIT_H_TEXT), _frozen(CLIP_VIT_H_VISION), 1024)
    return 0


@functools.cache
def text_encoder_parameters(backbone: str) -> dict[str, int]:
    """SD3.5-M's CLIP-L and CLIP-G text encoders (with projections) and T5-XXL's encoder; SD1.5's CLIP-L."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    with torch.device("meta"):
        if backbone == "sd15":
            return {"CLIP-L": _numel(CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L_TEXT)))}
        return {
            "CLIP-L": _numel(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_VIT_L_TEXT))),
            "CLIP-G": _numel(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT))),
            "T5-XXL": _numel(T5EncoderModel(T5Config(**T5_XXL))),
        }


# ------------------------------------------------------------------------------------------------
# Trackers
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
    """Bytes autograd keeps for the backward pass, by the block that saved them ("rest": everything
    outside a labelled block). Each storage counts once (views and tensors saved twice), parameters
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
class Footprint:
    """Bytes one item (a sequence of a denoiser call, an image) adds to a call of a network."""

    saved: float  # kept by autograd from a forward with grad until its backward
    backward: float  # extra live bytes while that backward runs
    inference: float  # peak live bytes of a no-grad call

    def scaled(self, factor: float) -> Footprint:
        return Footprint(self.saved * factor, self.backward * factor, self.inference * factor)


Call = Callable[[int], torch.Tensor]  # batch size -> a forward's output (inputs made inside)


def _measure_batch(
    call: Call, model: torch.nn.Module, saved: _SavedBytes, batch: int
) -> tuple[dict[str, int], int, int]:
    """(saved bytes by label, backward transient, no-grad peak) of ``call`` at one batch size."""
    saved.reset()
    live = _LiveBytes()
    with live, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
        loss = call(batch).float().pow(2).mean()
        after_forward = live.restart_peak()
        loss.backward()
        backward = live.peak - after_forward
    del loss
    model.zero_grad(set_to_none=True)  # the next backward allocates its LoRA gradients afresh
    inference = _LiveBytes()
    with torch.no_grad(), inference:
        call(batch)
    return dict(saved.by_label), backward, inference.peak


def per_item(
    call: Call, model: torch.nn.Module, saved: _SavedBytes | None = None
) -> tuple[dict[str, float], Footprint]:
    """One item's bytes of ``call`` (a forward of ``model``): the difference between batch 2 and batch 1;
    the saved bytes also by the label ``saved`` gave them."""
    saved = saved or _SavedBytes(_parameter_storages(model))
    (saved_1, backward_1, inference_1), (saved_2, backward_2, inference_2) = (
        _measure_batch(call, model, saved, 1),
        _measure_batch(call, model, saved, 2),
    )
    slope = {label: float(saved_2.get(label, 0) - saved_1.get(label, 0)) for label in saved_2}
    backward = float(max(backward_2 - backward_1, 0))  # tiny inputs: noise around 0
    return slope, Footprint(sum(slope.values()), backward, float(inference_2 - inference_1))


def _filled(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A meta-device model on the CPU in ``dtype`` with random weights (only the shapes matter),
    frozen; filling skips the slow default init."""
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.uniform_(-0.02, 0.02)
    return model.requires_grad_(False)


def _parameter_storages(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def _add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: list[str]) -> None:
    """The policy adapter as the backbone adds it: peft, gaussian init, fp32, the only trainable part."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    model.add_adapter(config)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
        p.requires_grad_("lora_" in name)


Lora = tuple[int, float, tuple[str, ...]]  # rank, alpha, targets


# ------------------------------------------------------------------------------------------------
# SD3.5-M's transformer at reduced depth
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activations:
    """Measured bytes per sequence (one row's conditional or unconditional half under CFG)."""

    saved: dict[str, float]  # autograd-saved bytes: "rest" and one block of each kind
    backward: float  # extra live bytes while the backward runs (one block recomputed, gradients)
    inference: float  # peak live bytes of a no-grad forward (one block's intermediates at a time)
    layers: int  # depth of the measured copy

    def saved_for(self, layers: int, dual: int) -> float:
        """Saved bytes of a ``layers``-deep model with ``dual`` MMDiT-X blocks first and the last block
        context_pre_only: the measured per-block bytes added up."""
        plain = layers - dual - 1
        return (
            self.saved["rest"] + dual * self.saved["dual"] + plain * self.saved["plain"] + self.saved["last"]
        )

    def full_depth(self) -> Footprint:
        """The per-sequence footprint of SD3.5-M's 24 blocks (13 of them MMDiT-X)."""
        full = architectures.SD35_MEDIUM_TRANSFORMER
        saved = self.saved_for(full["num_layers"], len(full["dual_attention_layers"]))
        return Footprint(saved, self.backward, self.inference)


def _block_kinds(layers: int, dual: int) -> list[str]:
    return ["last" if i == layers - 1 else "dual" if i < dual else "plain" for i in range(layers)]


def reduced_transformer(layers: int, dual: int, dtype: torch.dtype, grid: int = 384) -> torch.nn.Module:
    """A full-width SD3.5-M transformer of ``layers`` blocks on the CPU, in ``dtype``, with random
    weights. Its position table is cropped to the ``grid`` of patches measured (the forward crops it
    anyway)."""
    model = architectures.sd35_medium_transformer(
        "meta", num_layers=layers, dual_attention_layers=tuple(range(dual)), pos_embed_max_size=grid
    )
    return _filled(model, dtype)


def measure_activations(
    layers: int = REDUCED_LAYERS,
    image_tokens: int = 32**2,
    text_tokens: int = CLIP_TOKENS + 128,
    checkpointing: bool = True,
    precision: str = "fp16",
    *,
    lora: Lora = (32, 64.0, architectures.SD35_JOINT_ATTENTION),
    dual: int = 1,
) -> Activations:
    """Bytes per sequence of ``image_tokens`` + ``text_tokens`` in a reduced-depth real SD3.5-M (one
    training forward + backward and one no-grad forward; what does not grow with the batch, e.g.
    autocast's half copies of the LoRA weights and the LoRA gradients, drops out: the plan counts it
    from the weights). Gradient checkpointing is diffusers' own (non-reentrant), with the block it
    runs labelled so its saved inputs count there."""
    half = precision != "fp32"
    dtype = torch.bfloat16 if half else torch.float32
    torch.manual_seed(0)
    grid = round(math.sqrt(image_tokens))
    model = reduced_transformer(layers, dual, dtype, grid)
    rank, alpha, targets = lora
    _add_lora(model, rank, alpha, list(targets))
    kinds = dict(zip(map(id, model.transformer_blocks), _block_kinds(layers, dual), strict=True))
    saved = _SavedBytes(_parameter_storages(model))
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

    def call(batch: int) -> torch.Tensor:
        side = grid * config.patch_size
        x = torch.randn(batch, config.in_channels, side, side)
        text = torch.randn(batch, text_tokens, config.joint_attention_dim, dtype=dtype)
        pooled = torch.randn(batch, config.pooled_projection_dim, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            timestep = torch.full((batch,), 500.0)
            out = model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep)
        return out.sample

    slope, footprint = per_item(call, model, saved)
    per_block = {kind: _per_kind(slope, kinds, kind) for kind in ("dual", "plain", "last")}
    return Activations(
        saved={"rest": slope.get("rest", 0.0), **per_block},
        backward=footprint.backward,
        inference=footprint.inference,
        layers=layers,
    )


def _per_kind(by_label: dict[str, float], kinds: dict[int, str], kind: str) -> float:
    count = sum(k == kind for k in kinds.values())
    return by_label.get(kind, 0.0) / count if count else 0.0


# ------------------------------------------------------------------------------------------------
# SD1.5's UNet and the image decoders at a reduced side
# ------------------------------------------------------------------------------------------------


def measure_unet(
    resolution: int,
    lora: Lora,
    precision: str = "bf16",
    checkpointing: bool = False,
    side: int = MEASURED_SIDE,
    **overrides: Any,
) -> Footprint:
    """Bytes per sequence of the full SD1.5 UNet with the policy LoRA at ``resolution`` px, measured
    on ``side`` x ``side`` latents with CLIP-L's 77 text tokens and scaled by pixels (``overrides``:
    a smaller UNet, for tests)."""
    half = precision != "fp32"
    dtype = torch.bfloat16 if half else torch.float32
    torch.manual_seed(0)
    model = _filled(architectures.sd15_unet("meta", **overrides), dtype)
    rank, alpha, targets = lora
    _add_lora(model, rank, alpha, list(targets or architectures.ATTENTION_PROJECTIONS))
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    config = model.config

    def call(batch: int) -> torch.Tensor:
        x = torch.randn(batch, config.in_channels, side, side)
        text = torch.randn(batch, CLIP_TOKENS, config.cross_attention_dim, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            out = model(x, torch.full((batch,), 500.0), encoder_hidden_states=text)
        return out.sample

    _, footprint = per_item(call, model)
    return footprint.scaled((resolution // 8 / side) ** 2)


def measure_decoder(name: str, resolution: int, side: int = MEASURED_SIDE, **overrides: Any) -> Footprint:
    """Bytes per image of a published decoder (architectures.DECODERS) turning latents into images in
    [0, 1] at ``resolution`` px, in fp32 as the backbones decode, with the gradient to the latents (a
    reward's gradient) or without; measured at ``side`` and scaled by pixels."""
    torch.manual_seed(0)
    decoder = _filled(architectures.image_decoder(name, "meta", **overrides), torch.float32)
    channels = decoder.config.latent_channels

    def call(batch: int) -> torch.Tensor:
        z = torch.randn(batch, channels, side, side, requires_grad=torch.is_grad_enabled())
        return (decoder.decode(z).sample / 2 + 0.5).clamp(0, 1)

    _, footprint = per_item(call, decoder)
    return footprint.scaled((resolution // 8 / side) ** 2)


# ------------------------------------------------------------------------------------------------
# A CLIP reward's vision tower
# ------------------------------------------------------------------------------------------------


def measure_clip_vision(vision: dict[str, Any], depths: tuple[int, int] = (1, 2)) -> Footprint:
    """Bytes per image of a CLIP reward's vision tower (fp32, as the rewards run) with the gradient to
    its input pixels: measured at two reduced depths, the saved bytes extrapolated per layer to the
    tower's depth (the peaks of a backward or a no-grad call are one layer's, taken as measured)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    measured = {}
    for depth in depths:
        torch.manual_seed(0)
        config = CLIPVisionConfig(**{**vision, "num_hidden_layers": depth})
        tower = CLIPVisionModelWithProjection(config).requires_grad_(False)  # a few layers: built directly

        def call(batch: int, tower=tower, size=config.image_size) -> torch.Tensor:
            pixels = torch.randn(batch, 3, size, size, requires_grad=torch.is_grad_enabled())
            return tower(pixel_values=pixels).image_embeds

        measured[depth] = per_item(call, tower)[1]
    low, high = (measured[d] for d in depths)
    per_layer = (high.saved - low.saved) / (depths[1] - depths[0])
    saved = low.saved + per_layer * (vision["num_hidden_layers"] - depths[0])
    return Footprint(saved, high.backward, high.inference)
