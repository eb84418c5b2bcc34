"""One consistent checkpoint per epoch across the data-parallel processes.

Each process holds state the others do not (its shards' random generators and samplers), so a
checkpoint is one file per rank. They are only usable together: a resume that mixed rank 0 of epoch
12 with rank 1 of epoch 11 would train on silently. So every rank writes its file into the epoch's
own folder, the processes meet at a barrier, and only then does rank 0 write ``manifest.json``
naming the epoch, the number of processes and every rank's file with its sha256. The manifest is the
commit point: a process killed anywhere before it leaves the previous manifest, and the files it
names, untouched. Older epoch folders are removed after the new manifest is written.

    <run>/checkpoints/manifest.json
    <run>/checkpoints/epoch-000012/rank0.safetensors, rank1.safetensors, rank0.json, rank1.json
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from rsm_core.records import atomic_write_text, load_tensors_metadata, sha256

MANIFEST = "manifest.json"


class CheckpointMismatch(RuntimeError):
    """The checkpoint on disk does not belong to this set of processes, or its files disagree."""


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def epoch_folder(run_dir: Path, epoch: int) -> Path:
    return folder(run_dir) / f"epoch-{epoch:06d}"


def rank_file(run_dir: Path, epoch: int, rank: int) -> Path:
    return epoch_folder(run_dir, epoch) / f"rank{rank}.safetensors"


def read_manifest(run_dir: Path) -> dict | None:
    """The last committed checkpoint's manifest, or None when the run has none yet."""
    path = folder(run_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def latest(run_dir: Path, rank: int = 0) -> Path | None:
    """Rank ``rank``'s file of the last committed checkpoint (None without one)."""
    manifest = read_manifest(run_dir)
    entry = None if manifest is None else manifest["ranks"].get(str(rank))
    return None if entry is None else folder(run_dir) / entry["file"]


def write_rank(run_dir: Path, epoch: int, rank: int, save: Callable[[Path], None]) -> None:
    """Save this rank's state with ``save(path)`` (atomic) and record its epoch and hash beside it."""
    path = rank_file(run_dir, epoch, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".rank{rank}.*.tmp"):  # a write of this rank killed before its rename
        stale.unlink(missing_ok=True)
    save(path)
    note = {"epoch": epoch, "file": path.relative_to(folder(run_dir)).as_posix(), "sha256": sha256(path)}
    atomic_write_text(path.with_suffix(".json"), json.dumps(note) + "\n")


def commit(run_dir: Path, epoch: int, processes: int) -> None:
    """Rank 0, after every rank has written: check the ranks' notes agree, write the manifest, and
    remove the checkpoints it replaces."""
    notes = {}
    for rank in range(processes):
        note_path = rank_file(run_dir, epoch, rank).with_suffix(".json")
        if not note_path.exists():
            raise CheckpointMismatch(f"rank {rank} wrote no checkpoint for epoch {epoch} ({note_path})")
        notes[str(rank)] = json.loads(note_path.read_text())
    epochs = {note["epoch"] for note in notes.values()}
    if epochs != {epoch}:
        raise CheckpointMismatch(f"the ranks' checkpoints name epochs {sorted(epochs)}, expected {epoch}")
    manifest = {
        "epoch": epoch,
        "processes": processes,
        "ranks": {rank: {"file": note["file"], "sha256": note["sha256"]} for rank, note in notes.items()},
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(folder(run_dir) / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    for old in folder(run_dir).glob("epoch-*"):
        if old.is_dir() and old != epoch_folder(run_dir, epoch):
            shutil.rmtree(old, ignore_errors=True)


def verified(run_dir: Path, rank: int, processes: int) -> Path | None:
    """This rank's file of the committed checkpoint, checked against the manifest: the same number
    of processes, the file's hash, and the epoch its bookkeeping names. None without a checkpoint."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        return None
    where = folder(run_dir) / MANIFEST
    if manifest["processes"] != processes:
        raise CheckpointMismatch(
            f"{where} was written by {manifest['processes']} processes and this run has {processes}: "
            f"resume with the same number of processes (the ranks' sampler states differ)"
        )
    entry = manifest["ranks"].get(str(rank))
    path = folder(run_dir) / entry["file"] if entry else None
    if path is None or not path.exists():
        raise CheckpointMismatch(f"{where} names no file for rank {rank}, or it is missing ({path})")
    if sha256(path) != entry["sha256"]:
        raise CheckpointMismatch(
            f"{path} does not match the sha256 in {where}: the file was changed or damaged after the "
            f"checkpoint was committed; restore it, or remove {folder(run_dir)} to restart the run"
        )
    saved_epoch = json.loads(load_tensors_metadata(path)["bookkeeping"])["epoch"]
    if saved_epoch != manifest["epoch"]:
        raise CheckpointMismatch(f"{path} holds epoch {saved_epoch} but {where} names {manifest['epoch']}")
    return path
