"""Shipped toy denoisers: safetensors files plus a manifest holding their sha256 and training settings.

Training both networks with the paper's settings takes about 12 minutes on 2 CPU cores, longer than
the figure's budget, so `make toy-assets` trains them once and the figure loads them after checking
the hashes. ``--retrain`` on the figure trains fresh ones instead.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rsm_core.manifests import checked_file, git_restore, read_manifest
from rsm_core.records import AssetError, atomic_write_text, load_tensors, save_tensors_atomic, sha256
from rsm_core.toy.denoiser import ToyDenoiser

ASSET_DIR = Path(__file__).parent / "assets"
MANIFEST = "manifest.json"
MODEL_NAMES = ("ft", "base")


@dataclass(frozen=True)
class TrainSettings:
    iterations: int = 2000
    batch_size: int = 4096
    lr: float = 1e-3  # not given in the extracted paper; the toy spec suggests 1e-3 [G]
    seed: int = 0


def save_denoisers(
    models: dict[str, ToyDenoiser], settings: TrainSettings, directory: Path, **provenance
) -> Path:
    """Write each model as safetensors and a manifest with hashes, settings and provenance."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, model in models.items():
        path = directory / f"denoiser_{name}.safetensors"
        save_tensors_atomic(path, model.state_dict())
        files[name] = {"file": path.name, "sha256": sha256(path)}
    manifest = {"train": asdict(settings), "models": files, **provenance}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return directory / MANIFEST


def _fix(directory: Path) -> str:
    """How to restore the denoisers in ``directory``: git for the shipped folder, else retraining there."""
    if Path(directory) == ASSET_DIR:
        restore = f"restore them with `{git_restore(ASSET_DIR)}`, or retrain them with `make toy-assets`"
    else:
        restore = (
            f"retrain them there with `python -m experiments.toy_assets --out {directory}` (`make "
            "toy-assets` retrains the shipped ones)"
        )
    return f"{restore} (~8 min), or pass --retrain to train fresh networks for this run"


def load_denoisers(settings: TrainSettings, directory: Path = ASSET_DIR) -> dict[str, ToyDenoiser]:
    """Load the shipped pair; refuse if a hash or the training settings differ from the manifest."""
    manifest_path = Path(directory) / MANIFEST
    fix = _fix(directory)
    manifest = read_manifest(manifest_path, fix)
    if manifest.get("train") != asdict(settings):
        raise AssetError(
            f"the shipped toy denoisers were trained with {manifest.get('train')}, but this run asks for "
            f"{asdict(settings)}; {fix}"
        )
    models = {}
    for name in MODEL_NAMES:
        path = checked_file(directory, manifest.get("models", {}).get(name), name, manifest_path, fix)
        model = ToyDenoiser()
        model.load_state_dict(load_tensors(path))
        models[name] = model.eval()
    return models
