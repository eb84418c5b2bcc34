"""The tiny world's shipped weights: safetensors files plus a manifest (sha256 of each file, the
command, the git sha, settings, timings and measured quality). Loading checks every hash."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from reward_models.shapes_aesthetic import AestheticNet, ShapesAesthetic
from reward_models.shapes_clip import ShapesCLIP, ShapesHPS, TinyCLIP
from rsm_core.backbones.tiny import TinyDiffusion, TinyFlow
from rsm_core.records import AssetError, atomic_write_text, load_tensors, save_tensors_atomic, sha256
from rsm_core.world import prompts

ASSET_DIR = Path(__file__).parent / "assets"
MANIFEST = "manifest.json"
FILES = {
    "clip": "clip.safetensors",
    "aesthetic": "aesthetic.safetensors",
    "flow": "tiny_flow.safetensors",
    "diffusion": "tiny_diffusion.safetensors",
}


@dataclass(frozen=True)
class Sampling:
    """A backbone's default deterministic sampler: steps and CFG scale."""

    steps: int
    cfg: float


SAMPLING = {"flow": Sampling(steps=20, cfg=4.5), "diffusion": Sampling(steps=20, cfg=5.0)}


@dataclass
class World:
    """Everything pretrained: the CLIP model (whose text tower conditions both backbones), the rewards
    and the two reference backbones."""

    clip: TinyCLIP
    aesthetic_net: AestheticNet
    flow: TinyFlow
    diffusion: TinyDiffusion

    @property
    def rewards(self) -> dict[str, object]:
        clip, aesthetic = ShapesCLIP(self.clip), ShapesAesthetic(self.aesthetic_net)
        return {"shapes_clip": clip, "shapes_aesthetic": aesthetic, "shapes_hps": ShapesHPS(clip, aesthetic)}


def build_world() -> World:
    """Freshly initialised models of the shipped architectures."""
    clip = TinyCLIP(prompts.vocabulary())
    return World(clip, AestheticNet(), TinyFlow(clip.text), TinyDiffusion(clip.text))


def _modules(world: World) -> dict[str, nn.Module]:
    return {
        "clip": world.clip,
        "aesthetic": world.aesthetic_net,
        "flow": world.flow.model,
        "diffusion": world.diffusion.model,
    }


def save_world(world: World, directory: Path, provenance: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, module in _modules(world).items():
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


def load_world(directory: Path = ASSET_DIR) -> World:
    manifest_path = directory / MANIFEST
    fix = "run `make tiny-assets` to retrain them (about an hour on 2 cores), or restore them with git"
    if not manifest_path.exists():
        raise AssetError(f"the tiny world's weights are missing ({manifest_path} not found); {fix}")
    manifest = json.loads(manifest_path.read_text())
    world = build_world()
    for name, module in _modules(world).items():
        entry = manifest["files"][name]
        path = directory / entry["file"]
        if not path.exists() or sha256(path) != entry["sha256"]:
            raise AssetError(f"{path} is missing or its sha256 differs from {manifest_path}; {fix}")
        module.load_state_dict(load_tensors(path))
        module.requires_grad_(False).eval()
    return world


def world_fingerprint(directory: Path = ASSET_DIR) -> dict[str, str]:
    """The sha256 of each shipped weight file, from the manifest (load_world checks the files against
    it): runs record it so results from a retrained world are never mistaken for the old world's."""
    manifest = json.loads((directory / MANIFEST).read_text())
    return {name: entry["sha256"] for name, entry in sorted(manifest["files"].items())}


def update_manifest(directory: Path, **fields) -> None:
    """Add or replace top-level manifest fields (tiny-check records the measured quality this way)."""
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest.update(fields)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
