"""The tiny world's shipped weights: safetensors files plus a manifest (sha256 of each file, the
command, the git sha, settings, timings and measured quality). Loading checks every hash
(rsm_core.manifests).

The core loads what it owns — the text encoder (the tiny CLIP's text tower) and the two reference
backbones; the learned rewards load their own files through ``load_state`` (reward_models.world).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from rsm_core.backbones.text import TinyTextEncoder
from rsm_core.backbones.tiny import TinyDiffusion, TinyFlow
from rsm_core.manifests import checked_file, git_restore, read_manifest
from rsm_core.records import atomic_write_text, load_tensors, save_tensors_atomic, sha256
from rsm_core.world import prompts

ASSET_DIR = Path(__file__).parent / "assets"
MANIFEST = "manifest.json"
FILES = {
    "clip": "clip.safetensors",
    "aesthetic": "aesthetic.safetensors",
    "flow": "tiny_flow.safetensors",
    "diffusion": "tiny_diffusion.safetensors",
}
TEXT_TOWER = "text."  # the prefix of the text encoder's weights inside the CLIP file


@dataclass(frozen=True)
class Sampling:
    """A backbone's default deterministic sampler: steps and CFG scale."""

    steps: int
    cfg: float


SAMPLING = {"flow": Sampling(steps=20, cfg=4.5), "diffusion": Sampling(steps=20, cfg=5.0)}


@dataclass
class Backbones:
    """The two reference backbones, conditioned on the frozen text encoder they share."""

    text: TinyTextEncoder
    flow: TinyFlow
    diffusion: TinyDiffusion


def build_backbones(text: TinyTextEncoder | None = None) -> Backbones:
    """Freshly initialised backbones of the shipped architectures on ``text`` (default: a fresh one)."""
    text = text or TinyTextEncoder(prompts.vocabulary())
    return Backbones(text, TinyFlow(text), TinyDiffusion(text))


def _fix(directory: Path) -> str:
    """How to restore the weights in ``directory``: git for the shipped folder, else retraining there."""
    hour = "about an hour on 2 cores"
    if Path(directory) == ASSET_DIR:
        return (
            f"restore them with `{git_restore(ASSET_DIR)}`, or retrain them with `make tiny-assets` ({hour})"
        )
    return (
        f'retrain them there with `make tiny-assets ARGS="--out {directory}"` ({hour}), or copy the '
        f"shipped ones from {ASSET_DIR}"
    )


def load_state(name: str, directory: Path = ASSET_DIR) -> dict[str, Tensor]:
    """The state dict of one shipped file (``FILES``), after checking its sha256 against the manifest."""
    manifest_path = Path(directory) / MANIFEST
    files = read_manifest(manifest_path, _fix(directory)).get("files", {})
    return load_tensors(checked_file(directory, files.get(name), name, manifest_path, _fix(directory)))


def load_backbones(directory: Path = ASSET_DIR) -> Backbones:
    """The shipped text encoder and reference backbones, frozen."""
    clip = load_state("clip", directory)
    backbones = build_backbones()
    backbones.text.load_state_dict(
        {key[len(TEXT_TOWER) :]: value for key, value in clip.items() if key.startswith(TEXT_TOWER)}
    )
    backbones.flow.model.load_state_dict(load_state("flow", directory))
    backbones.diffusion.model.load_state_dict(load_state("diffusion", directory))
    for module in (backbones.text, backbones.flow.model, backbones.diffusion.model):
        module.requires_grad_(False).eval()
    return backbones


def save_assets(modules: dict[str, nn.Module], directory: Path, provenance: dict) -> Path:
    """Write each module of ``FILES`` and the prompt splits, then the manifest that names their hashes."""
    if set(modules) != set(FILES):
        raise ValueError(f"the tiny world ships exactly {sorted(FILES)}, got {sorted(modules)}")
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, module in modules.items():
        path = directory / FILES[name]
        save_tensors_atomic(path, {k: v.contiguous() for k, v in module.state_dict().items()})
        files[name] = {"file": path.name, "sha256": sha256(path), "bytes": path.stat().st_size}
    manifest = directory / MANIFEST
    content = {"files": files, "prompts": write_prompt_splits(directory), **provenance}
    atomic_write_text(manifest, json.dumps(content, indent=2, sort_keys=True) + "\n")
    return manifest


def write_prompt_splits(directory: Path) -> dict[str, dict]:
    """The train/test prompt metadata the world was trained and is evaluated on, as GenEval-style JSONL."""
    entries = {}
    for name, metadata in zip(("train", "test"), prompts.split(), strict=True):
        path = directory / f"{name}_metadata.jsonl"
        prompts.write_jsonl(path, metadata)
        entries[name] = {"file": path.name, "sha256": sha256(path), "entries": len(metadata)}
    return entries


def world_fingerprint(directory: Path = ASSET_DIR) -> dict[str, str]:
    """The sha256 of each shipped weight file, from the manifest (loading checks the files against
    it): runs record it so results from a retrained world are never mistaken for the old world's."""
    manifest = read_manifest(Path(directory) / MANIFEST, _fix(directory))
    return {name: entry["sha256"] for name, entry in sorted(manifest["files"].items())}


def update_manifest(directory: Path, **fields) -> None:
    """Add or replace top-level manifest fields (tiny-check records the measured quality this way)."""
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest.update(fields)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
