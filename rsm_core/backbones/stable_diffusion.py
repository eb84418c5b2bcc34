"""Stable Diffusion 3.5 Medium and 1.5 as backbones, loaded from local weights only.

- SD35: MMDiT transformer, rectified flow with velocity prediction, CLIP-L + CLIP-G + T5 conditioning
  built by the diffusers pipeline's own ``encode_prompt``;
- SD15: UNet, the scaled-linear 1000-step VP schedule with eps prediction, CLIP-L token states.

Weights are never downloaded here (the bench runs offline): a directory in diffusers layout, or a hub id
already in the local Hugging Face cache. Anything missing is an ``AssetError`` that names the missing
files and how to fetch them. SD35 can decode with the tiny autoencoder TAESD3 instead of its VAE, as
the published VGG-Flow code does for every reward (fo_first_order spec §0.2). Prompt embeddings can
be cached on disk, one safetensors file per prompt, so the text encoders (T5-XXL alone is ~10 GB) run
once per prompt across runs.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm import tqdm

from rsm_core.backbones.architectures import SD35_JOINT_ATTENTION
from rsm_core.backbones.base import BackboneBase, FlowSpec
from rsm_core.backbones.text import Cond
from rsm_core.records import AssetError, load_tensors, save_tensors_atomic

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_dtype(precision: Precision, half_frozen_weights: bool) -> torch.dtype:
    """The dtype of the frozen denoiser and text encoders (see _DiffusersBackbone)."""
    return PRECISIONS[precision] if half_frozen_weights else torch.float32


SD35_REPO = "stabilityai/stable-diffusion-3.5-medium"
# The spec's runwayml/stable-diffusion-v1-5 was withdrawn from the Hub; this is its maintained mirror.
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TAESD3_REPO = "madebyollin/taesd3"  # AutoencoderTiny for SD3 latents (diffusers layout at the repo root)
Decoder = Literal["vae", "taesd3"]

SD35_COMPONENTS = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "scheduler",
)
SD15_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# each backbone's published weights: (hub id, the pipeline components it loads)
PUBLISHED_WEIGHTS = {"sd35": (SD35_REPO, SD35_COMPONENTS), "sd15": (SD15_REPO, SD15_COMPONENTS)}


# ------------------------------------------------------------------------------------------------
# Finding the weights
# ------------------------------------------------------------------------------------------------


def _missing_in_folder(
    folder: Path, label: str, config: str = "config.json", network: bool = True
) -> list[str]:
    """What a model folder lacks (named ``label``/...): its config, or for a network any weights file."""
    missing = [] if (folder / config).is_file() else [f"{label}{config}"]
    if network and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append(f"{label}*.safetensors (the weights)")
    return missing


def _missing_in_component(root: Path, name: str) -> list[str]:
    """What a pipeline's component folder lacks: the folder itself, or its config and weights."""
    folder = root / name
    if not folder.is_dir():
        return [f"{name}/"]
    if name.startswith("tokenizer"):
        return _missing_in_folder(folder, f"{name}/", "tokenizer_config.json", network=False)
    if name == "scheduler":
        return _missing_in_folder(folder, f"{name}/", "scheduler_config.json", network=False)
    return _missing_in_folder(folder, f"{name}/")


def missing_files(root: Path, components: Sequence[str]) -> list[str]:
    """Files and folders (relative to root) a pipeline with these components needs but cannot find."""
    missing = [] if (root / "model_index.json").is_file() else ["model_index.json"]
    for name in components:
        missing.extend(_missing_in_component(root, name))
    return missing


def _download_hint(repo: str, setting: str = "the model path") -> str:
    return (
        f"download {repo} on a machine with network (`hf download {repo} --local-dir DIR`, after accepting "
        f"its licence on huggingface.co if it is gated), copy DIR here and pass DIR as {setting}"
    )


def _local_root(source: str | Path, repo: str, setting: str) -> Path:
    """``source`` as a local directory: itself, or a hub id's snapshot in the local HF cache (a partial
    one too: it may lack files this model never reads); never touches the network."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), local_files_only=True))
    except (OSError, ValueError) as error:  # not cached / not a valid repo id
        partial = getattr(error, "snapshot_path", None)  # huggingface_hub's IncompleteSnapshotError
        if partial is None:
            raise AssetError(
                f"no model at {source!r}: it is not a directory and not a hub id in the local Hugging "
                f"Face cache ({type(error).__name__}); {_download_hint(repo, setting)}"
            ) from None
        return Path(partial)


def _checked(root: Path, missing: list[str], repo: str, setting: str) -> Path:
    if missing:
        raise AssetError(
            f"incomplete weights in {root}: missing {', '.join(missing)}; {_download_hint(repo, setting)}"
        )
    return root


def resolve_weights(source: str | Path, components: Sequence[str], repo: str) -> Path:
    """The local diffusers pipeline directory for ``source`` (a directory, or a hub id already in the
    local HF cache), checked for completeness."""
    root = _local_root(source, repo, "the model path")
    return _checked(root, missing_files(root, components), repo, "the model path")


def resolve_model(source: str | Path, repo: str, setting: str) -> Path:
    """The local directory of a single diffusers model (config.json and weights at its root, as the
    TAESD3 repo is laid out), checked; ``setting`` names the config key a user passes it in."""
    root = _local_root(source, repo, setting)
    return _checked(root, _missing_in_folder(root, ""), repo, setting)


def _from_pretrained(cls: type, root: Path, repo: str, dtype: torch.dtype, setting: str, **kwargs):
    """from_pretrained on a checked directory; a loader failure (e.g. only an fp16 variant present) is
    reported as an asset problem, not a traceback from deep inside diffusers."""
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones lack dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return cls.from_pretrained(root, local_files_only=True, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError) as error:
        detail = " ".join(str(error).split())  # one line
        raise AssetError(
            f"could not load {cls.__name__} from {root}: {detail}; {_download_hint(repo, setting)}"
        ) from error


def load_tiny_decoder(source: str | Path = TAESD3_REPO) -> torch.nn.Module:
    """TAESD3 (diffusers ``AutoencoderTiny``) as the published VGG-Flow code loads it: weights in bf16,
    so they carry bf16 rounding after the backbone casts them to fp32 to decode (spec §0.2)."""
    from diffusers import AutoencoderTiny

    setting = "model.decoder_path"
    return _from_pretrained(
        AutoencoderTiny, resolve_model(source, TAESD3_REPO, setting), TAESD3_REPO, torch.bfloat16, setting
    )


# ------------------------------------------------------------------------------------------------
# Prompt embeddings on disk
# ------------------------------------------------------------------------------------------------


class PromptCache:
    """One safetensors file per prompt, named by the sha256 of the prompt and of everything that changes
    its embedding (model, max length, dtype), so a stale file is never read for another setting."""

    def __init__(self, directory: Path, key: dict[str, str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = key

    def path(self, prompt: str) -> Path:
        text = json.dumps({**self.key, "prompt": prompt}, sort_keys=True)
        return self.directory / f"{hashlib.sha256(text.encode()).hexdigest()}.safetensors"

    def load(self, prompt: str) -> Cond | None:
        path = self.path(prompt)
        if not path.is_file():
            return None
        tensors = load_tensors(path)
        return Cond(tensors["tokens"], tensors["mask"], tensors["pooled"])

    def save(self, prompt: str, cond: Cond) -> None:
        save_tensors_atomic(
            self.path(prompt), {"tokens": cond.tokens, "mask": cond.mask, "pooled": cond.pooled}
        )


# ------------------------------------------------------------------------------------------------
# Backbones
# ------------------------------------------------------------------------------------------------


class _DiffusersBackbone(BackboneBase):
    """Device and precision, frozen components and the disk cache shared by SD35 and SD15.

    ``precision`` fp16 / bf16: the frozen denoiser and text encoders are stored in that dtype, the LoRA
    weights in fp32, the denoiser's forward runs under autocast and returns fp32, the VAE stays fp32
    and TF32 matmuls are on (as published). Deviation, switch ``half_frozen_weights``: the published
    code keeps the frozen weights in fp32 under fp16 autocast (``half_frozen_weights=False``); autocast
    computes in half precision either way, and half-precision storage saves 4.5 GiB of SD3.5-M weights
    per GPU. ``gradient_checkpointing``
    recomputes the denoiser's blocks in the backward pass instead of keeping their activations.
    """

    latent_multiple: int  # the resolution must be a multiple of this (VAE factor x denoiser stride)
    memory_cache_prompts = 256  # a few epochs' prompts; everything else comes from the disk cache
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def __init__(
        self, pipe, device: str | torch.device, precision: Precision, frozen: torch.dtype, resolution: int
    ) -> None:
        """``frozen``: the dtype the pipeline was loaded in (``frozen_dtype``)."""
        super().__init__()
        self.device, self.dtype = torch.device(device), frozen
        self.autocast_dtype = None if precision == "fp32" else PRECISIONS[precision]
        self.pipe = pipe.to(self.device)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False).eval()  # LoRA is the only trainable part
        self.vae = pipe.vae.to(torch.float32)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.vae_scale_factor = pipe.vae_scale_factor  # the pipeline's, from the VAE it was saved with
        self.resolution = resolution
        self._disk: PromptCache | None = None
        self.text_encoders_dropped = False

    def _set_model(self, model: torch.nn.Module, gradient_checkpointing: bool) -> None:
        self.model = model
        if gradient_checkpointing:
            model.enable_gradient_checkpointing()

    def _autocast(self) -> torch.autocast:
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=enabled)

    def _check_resolution(self) -> None:
        if self.resolution % self.latent_multiple:
            raise ValueError(
                f"resolution {self.resolution} must be a multiple of {self.latent_multiple} for this model"
            )

    def _use_disk_cache(self, cache_dir: Path | None, source: str | Path, max_length: int) -> None:
        if cache_dir is None:
            return
        model = (
            str(Path(source).expanduser().resolve()) if Path(source).expanduser().is_dir() else str(source)
        )
        key = {"backbone": type(self).__name__, "model": model, "max_length": str(max_length)}
        self._disk = PromptCache(cache_dir, {**key, "dtype": str(self.dtype)})

    # --- conditioning ---------------------------------------------------------------------------
    def _encode_prompts(self, prompts: list[str]) -> Cond:
        raise NotImplementedError

    def _encode(self, prompts: Sequence[str]) -> Cond:
        """Prompts from the disk cache where present; the rest through the text encoders (then saved)."""
        found: dict[str, Cond] = {}
        if self._disk is not None:
            for prompt in prompts:
                cond = self._disk.load(prompt)
                if cond is not None:
                    found[prompt] = self._to_device(cond)
        todo = [p for p in dict.fromkeys(prompts) if p not in found]
        if todo and self.text_encoders_dropped:
            raise AssetError(
                f"{len(todo)} prompt(s) were not embedded before the text encoders were freed, e.g. "
                f"{todo[0]!r}; precompute every prompt of the run (make paper-embeddings) first"
            )
        if todo:
            fresh = self._encode_prompts(todo)
            for i, prompt in enumerate(todo):
                found[prompt] = fresh[i : i + 1]
                if self._disk is not None:
                    self._disk.save(prompt, found[prompt])
        return Cond.cat([found[p] for p in prompts])

    def precompute(self, prompts: Sequence[str], batch: int = 32) -> int:
        """Embed every prompt not yet in the disk cache, ``batch`` at a time, without keeping them in
        memory; returns how many were computed."""
        if self._disk is None:
            raise ValueError("precompute needs a disk cache (cache_dir) to write the embeddings to")
        todo = [p for p in dict.fromkeys(prompts) if not self._disk.path(p).is_file()]
        for start in tqdm(
            range(0, len(todo), batch), desc="prompt embeddings", unit="batch", disable=not todo
        ):
            chunk = todo[start : start + batch]
            with torch.no_grad():
                cond = self._encode_prompts(chunk)
            for i, prompt in enumerate(chunk):
                self._disk.save(prompt, cond[i : i + 1])
        return len(todo)

    def drop_text_encoders(self) -> None:
        """Free the text encoders (T5-XXL alone is about 9 GiB in half precision) once every prompt
        of the run is on disk; an unseen prompt is then an error that names it."""
        if self._disk is None:
            raise ValueError("without a disk cache the text encoders are still needed")
        for name in self.TEXT_ENCODERS:
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
        self.text_encoders_dropped = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _to_device(self, cond: Cond) -> Cond:
        return Cond(
            cond.tokens.to(self.device, self.dtype),
            cond.mask.to(self.device),
            cond.pooled.to(self.device, self.dtype),
        )

    # --- images ---------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.vae_scale_factor
        return (self.model.config.in_channels, side, side)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [0, 1], differentiable: divided by the decoder config's scaling factor,
        its shift factor added where the config has one, decoded (the VAE and TAESD both output the
        [-1, 1] convention), clamp((y + 1) / 2, 0, 1)."""
        config = self.vae.config
        z = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)
        images = self.vae.decode(z.to(self.device, self.vae.dtype)).sample
        return (images / 2 + 0.5).clamp(0, 1).to(latents.device, latents.dtype)

    def _in(self, x: Tensor) -> Tensor:
        """Inputs onto the model's device and dtype (samplers draw float32 noise on the CPU); outputs go
        back to the caller's device and dtype."""
        return x.to(self.device, self.dtype)


class SD35(_DiffusersBackbone):
    """Stable Diffusion 3.5 Medium: rectified flow (shift 3), velocity prediction, 512 px by default.

    ``decoder="taesd3"`` replaces the pipeline's VAE by TAESD3 before anything moves to the device
    (``load_tiny_decoder``; ``decoder_path``: a directory or hub id, default the published repo)."""

    lora_targets = SD35_JOINT_ATTENTION  # the zeroth-order code's; VGG-Flow passes its own

    def __init__(
        self,
        path: str | Path = SD35_REPO,
        *,
        resolution: int = 512,
        max_sequence_length: int = 256,
        cache_dir: Path | None = None,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        half_frozen_weights: bool = True,
        gradient_checkpointing: bool = False,
        decoder: Decoder = "vae",
        decoder_path: str | Path = TAESD3_REPO,
    ) -> None:
        from diffusers import StableDiffusion3Pipeline

        root = resolve_weights(path, SD35_COMPONENTS, SD35_REPO)
        frozen = frozen_dtype(precision, half_frozen_weights)
        pipe = _from_pretrained(StableDiffusion3Pipeline, root, SD35_REPO, frozen, "the model path")
        if decoder == "taesd3":
            pipe.vae = load_tiny_decoder(decoder_path)
        elif decoder != "vae":
            raise ValueError(f"decoder must be 'vae' or 'taesd3', got {decoder!r}")
        super().__init__(pipe, device, precision, frozen, resolution)
        self._set_model(pipe.transformer, gradient_checkpointing)
        self.max_sequence_length = max_sequence_length
        config = pipe.scheduler.config
        self.flow = FlowSpec(
            "rf-v",
            shift=float(config.get("shift", 3.0)),
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        )
        self.latent_multiple = self.vae_scale_factor * self.model.config.patch_size
        self._check_resolution()
        self._use_disk_cache(cache_dir, path, max_sequence_length)

    def _encode_prompts(self, prompts: list[str]) -> Cond:
        tokens, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Cond(tokens.to(self.dtype), mask, pooled.to(self.dtype))

    def _forward(self, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        with self._autocast():
            out = self.model(
                self._in(x),
                encoder_hidden_states=cond.tokens,
                pooled_projections=cond.pooled,
                timestep=timestep.to(self.device),
            ).sample
        return out.to(x.device, x.dtype)


class SD15(_DiffusersBackbone):
    """Stable Diffusion 1.5: VP schedule (scaled linear betas), eps prediction, 512 px by default."""

    output_layer = "conv_out"

    def __init__(
        self,
        path: str | Path = SD15_REPO,
        *,
        resolution: int = 512,
        cache_dir: Path | None = None,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        half_frozen_weights: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        from diffusers import StableDiffusionPipeline

        root = resolve_weights(path, SD15_COMPONENTS, SD15_REPO)
        frozen = frozen_dtype(precision, half_frozen_weights)
        pipe = _from_pretrained(
            StableDiffusionPipeline,
            root,
            SD15_REPO,
            frozen,
            "the model path",
            safety_checker=None,
            requires_safety_checker=False,
        )
        super().__init__(pipe, device, precision, frozen, resolution)
        self._set_model(pipe.unet, gradient_checkpointing)
        config = pipe.scheduler.config
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise AssetError(
                f"{root} predicts {config['prediction_type']!r}, SD15 expects eps; is it SD1.5? "
                f"{_download_hint(SD15_REPO)}"
            )
        self.flow = FlowSpec(
            "vp-eps",
            alphas_cumprod=pipe.scheduler.alphas_cumprod.to(torch.float32),
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        )
        self.latent_multiple = self.vae_scale_factor * 2 ** (len(self.model.config.block_out_channels) - 1)
        self._check_resolution()
        self._use_disk_cache(cache_dir, path, pipe.tokenizer.model_max_length)

    def _encode_prompts(self, prompts: list[str]) -> Cond:
        tokens, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        tokens = tokens.to(self.dtype)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Cond(tokens, mask, tokens[:, 0].clone())  # pooled: unused by the UNet, kept for the Cond type

    def _forward(self, x: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        with self._autocast():
            out = self.model(self._in(x), timestep.to(self.device), encoder_hidden_states=cond.tokens).sample
        return out.to(x.device, x.dtype)
