"""A run is a directory: config.yaml, env.json, metrics.jsonl, status.json, checkpoints.

Rules that keep results trustworthy: a run directory is created exclusively (never reused or
overwritten); every whole-file write is atomic (temp file, fsync, rename); status.json says
"running" until ``finish`` marks it "complete" (or "failed"), and readers refuse incomplete runs by
default. wandb mirrors the run (offline unless WANDB_MODE says otherwise) but is never the source
of truth, and a wandb failure never stops a run. Environment variables are never recorded.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from rsm_core.config import config_to_dict, to_yaml

PACKAGES = (
    "torch",
    "numpy",
    "diffusers",
    "peft",
    "accelerate",
    "transformers",
    "wandb",
    "omegaconf",
    "safetensors",
)


class RunExistsError(FileExistsError):
    """The run directory already exists; runs are never overwritten."""


class IncompleteRunError(RuntimeError):
    """A reader was pointed at a run that did not finish."""


class DiskFullError(OSError):
    """A write failed for lack of space; what was written before it is intact."""


def _disk_full(error: OSError, path: Path, lost: str) -> OSError:
    """``error`` as a DiskFullError naming the file and what was (not) lost, if it is ENOSPC."""
    if error.errno != errno.ENOSPC:
        return error
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on the disk holding {path}: {lost}. Everything written before is intact; free "
        f"space there and rerun the same command to resume",
    )


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it
    os.umask(mask)
    return mask


def _file_mode() -> int:
    """The mode a plainly created file gets (0666 less the umask): temp files start at 0600, and a
    result a cluster group should read must not stay that way."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            lost = f"{path.name} was not written (its previous version, if any, is kept)"
            raise _disk_full(error, path, lost) from error
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_tensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """safetensors written atomically (a crash leaves the previous file or none, never half a file);
    ``metadata`` (strings) travels in the same file, so tensors and bookkeeping can never disagree."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(cpu, metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def load_tensors_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


# ------------------------------------------------------------------------------------------------
# Environment snapshot
# ------------------------------------------------------------------------------------------------


def git(*args: str) -> str | None:
    """Output of a git command run in this package's checkout, or None without git or a repository."""
    try:
        result = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Code version, package versions, threads and device — and deliberately no environment variables."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    dirty = git("status", "--porcelain")
    return {
        "git_sha": git("rev-parse", "HEAD") or "unknown",
        "git_dirty": None if dirty is None else bool(dirty),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "packages": versions,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cuda_devices": torch.cuda.device_count(),
        "argv": sys.argv,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _config_text(config: Any) -> str:
    """What config.yaml holds for a config (YAML, or JSON for a plain dict)."""
    return to_yaml(config) if not isinstance(config, dict) else json.dumps(config, indent=2)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WandbIdentity:
    """Where a run sits in wandb: its sweep (group), its arm (job type), tags to filter by, and a
    readable name. Entity and project come from WANDB_ENTITY / WANDB_PROJECT."""

    group: str | None = None
    job_type: str | None = None
    tags: tuple[str, ...] = ()
    name: str | None = None


WANDB_FILE = "wandb.json"  # the wandb run's id and identity, so a resumed run continues the same run


class RunRecord:
    """One run's directory; use ``RunRecord.create`` (exclusive) and close with ``finish``."""

    def __init__(self, path: Path, config_dict: dict, wandb_run: Any = None) -> None:
        self.path = path
        self.config = config_dict
        self._wandb = wandb_run

    @classmethod
    def create(
        cls,
        root: Path,
        name: str,
        config: Any,
        *,
        wandb: bool | str = "auto",
        inputs: dict | None = None,
        identity: WandbIdentity | None = None,
    ) -> RunRecord:
        """A new run directory. ``inputs`` (inputs.json) names what the run reads besides its config,
        e.g. the fingerprints of the weights it loads, so a run is never resumed or reused on others."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        path = root / name
        try:
            path.mkdir()
        except FileExistsError:
            raise RunExistsError(
                f"run directory {path} already exists and runs are never overwritten: choose another name "
                f"(--name), or delete that directory if you no longer need it"
            ) from None
        config_dict = config_to_dict(config) if not isinstance(config, dict) else config
        atomic_write_text(path / "config.yaml", _config_text(config))
        if inputs:
            atomic_write_text(path / "inputs.json", json.dumps(inputs, indent=2, sort_keys=True) + "\n")
        atomic_write_text(path / "env.json", json.dumps(environment(), indent=2) + "\n")
        atomic_write_text(path / "status.json", json.dumps({"state": "running"}) + "\n")
        (path / "metrics.jsonl").touch()
        return cls(path, config_dict, _start_wandb(path, name, config_dict, wandb, identity))

    @staticmethod
    def matches(path: Path, config: Any, inputs: dict | None = None) -> bool:
        """Whether the run at ``path`` was started with exactly this config and these inputs."""
        path = Path(path)
        saved_config = (path / "config.yaml").read_text() if (path / "config.yaml").exists() else None
        saved_inputs = (
            json.loads((path / "inputs.json").read_text()) if (path / "inputs.json").exists() else {}
        )
        return saved_config == _config_text(config) and saved_inputs == (inputs or {})

    @classmethod
    def create_or_resume(
        cls,
        root: Path,
        name: str,
        config: Any,
        *,
        wandb: bool | str = "auto",
        inputs: dict | None = None,
        identity: WandbIdentity | None = None,
    ) -> RunRecord:
        """A new run, or the unfinished run of the same name, config and inputs (the rerun of a killed
        command). A complete run, or one with another config or inputs, is never touched."""
        path = Path(root) / name
        if not path.exists():
            return cls.create(root, name, config, wandb=wandb, inputs=inputs, identity=identity)
        if cls.is_complete(path):
            raise RunExistsError(
                f"run {path} is already complete and runs are never overwritten: choose another name, "
                "or delete that directory to rerun it"
            )
        config_dict = config_to_dict(config) if not isinstance(config, dict) else config
        if not cls.matches(path, config, inputs):
            raise RunExistsError(
                f"run directory {path} holds an unfinished run with a different config or inputs "
                "(inputs.json, e.g. a retrained tiny world); resume it with its own, choose another "
                "name, or delete the directory"
            )
        atomic_write_text(path / "status.json", json.dumps({"state": "running", "resumed": True}) + "\n")
        return cls(path, config_dict, _start_wandb(path, name, config_dict, wandb, identity))

    def truncate_metrics(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Drop the metrics rows ``keep`` rejects (rows logged after the checkpoint a resume starts from)."""
        rows = read_metrics(self.path, allow_incomplete=True)
        text = "".join(json.dumps(row) + "\n" for row in rows if keep(row))
        atomic_write_text(self.path / "metrics.jsonl", text)

    def log(self, row: dict[str, Any]) -> None:
        """Append one row to metrics.jsonl (flushed and fsynced; a failed write is cut back off, so the
        file never ends in half a row) and mirror it to wandb."""
        clean = {k: _jsonable(v) for k, v in row.items()}
        target = self.path / "metrics.jsonl"
        with open(target, "ab") as handle:
            size = handle.tell()
            try:
                handle.write((json.dumps(clean) + "\n").encode())
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as error:
                os.truncate(target, size)
                lost = f"the row of epoch {clean.get('epoch')} was not logged"
                raise _disk_full(error, target, lost) from error
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in clean.items() if isinstance(v, int | float | bool)})
            except Exception as error:  # the mirror must never kill the run
                self._drop_wandb(error)

    def log_image(self, key: str, image: Path, epoch: int) -> None:
        """Mirror an image file of the run directory to wandb at ``epoch`` (the file is the record)."""
        if self._wandb is None:
            return
        try:
            import wandb

            self._wandb.log({key: wandb.Image(str(image)), "epoch": epoch})
        except Exception as error:
            self._drop_wandb(error)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        target = self.path / name
        save_tensors_atomic(target, tensors)
        return target

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        self._set_status({"state": "complete", **(summary or {})})
        self._close_wandb()

    def fail(self, error: BaseException) -> None:
        self._set_status({"state": "failed", "error": f"{type(error).__name__}: {error}"})
        self._close_wandb()

    def preempt(self, epoch: int) -> None:
        """Stopped on request after checkpointing ``epoch``: rerunning the same command resumes it."""
        self._set_status({"state": "preempted", "epoch": epoch})
        self._close_wandb()

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.fail(exc)

    def _set_status(self, status: dict[str, Any]) -> None:
        status["ended"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(self.path / "status.json", json.dumps(status, indent=2) + "\n")

    def _drop_wandb(self, error: Exception) -> None:
        warnings.warn(
            f"wandb mirror disabled after an error ({error}); metrics.jsonl is unaffected", stacklevel=3
        )
        self._wandb = None

    def _close_wandb(self) -> None:
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as error:
                self._drop_wandb(error)
            self._wandb = None

    @staticmethod
    def is_complete(path: Path) -> bool:
        status = Path(path) / "status.json"
        return status.exists() and json.loads(status.read_text()).get("state") == "complete"


def read_metrics(path: Path, *, allow_incomplete: bool = False) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl; an unfinished or failed run is refused unless allowed."""
    path = Path(path)
    if not (path / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{path} is not a run directory (no metrics.jsonl)")
    if not allow_incomplete and not RunRecord.is_complete(path):
        state = (
            json.loads((path / "status.json").read_text()).get("state")
            if (path / "status.json").exists()
            else "?"
        )
        raise IncompleteRunError(
            f"run {path} is not complete (state: {state}); its metrics may be partial. "
            "Rerun it, or pass allow_incomplete=True to read what it logged."
        )
    with open(path / "metrics.jsonl") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _wandb_id() -> str:
    """A new wandb run id (8 lowercase letters and digits, as wandb makes them)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _start_wandb(
    path: Path, name: str, config: dict, wanted: bool | str, identity: WandbIdentity | None = None
) -> Any:
    """A wandb run mirroring this one, or None (disabled, not installed, or failed to start). Its id
    is kept in the run directory (wandb.json), so a resumed run continues the same wandb run; every
    key is plotted against ``epoch``."""
    if wanted is False:
        return None
    try:
        import wandb
    except ImportError:
        if wanted is True:
            warnings.warn("wandb is not installed; running without the mirror", stacklevel=3)
        return None
    directory = path / "wandb"
    directory.mkdir(exist_ok=True)
    identity = identity or WandbIdentity()
    saved = path / WANDB_FILE
    try:
        if saved.exists():
            where = json.loads(saved.read_text())
        else:
            where = {
                "id": _wandb_id(),
                "entity": os.environ.get("WANDB_ENTITY") or None,
                "project": os.environ.get("WANDB_PROJECT") or "rsm-bench",
                "group": identity.group,
                "job_type": identity.job_type,
                "name": identity.name or name,
                "tags": list(identity.tags),
            }
            atomic_write_text(saved, json.dumps(where, indent=2) + "\n")
        run = wandb.init(
            id=where["id"],
            resume="allow",
            entity=where["entity"],
            project=where["project"],
            group=where["group"],
            job_type=where["job_type"],
            name=where["name"],
            tags=where["tags"],
            config=config,
            dir=str(directory),
            mode=os.environ.get("WANDB_MODE", "offline"),
            settings=wandb.Settings(silent=True, console="off"),
        )
        run.define_metric("epoch")
        run.define_metric("*", step_metric="epoch")
        return run
    except Exception as error:
        warnings.warn(f"wandb did not start ({error}); running without the mirror", stacklevel=3)
        return None


class AssetError(RuntimeError):
    """Shipped weights are missing, altered, or were trained with other settings."""


DATA_ENV = "RSM_BENCH_DATA"
DEFAULT_DATA_ROOT = Path("~/.cache/rsm_bench")


def data_root() -> Path:
    """Where `make paper-data` puts the prompt files and the aesthetic head: ``$RSM_BENCH_DATA``, else
    ``~/.cache/rsm_bench``. In the core so that the fetcher and every reader agree on one place."""
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_ROOT).expanduser()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SAMPLE_BYTES = 1 << 20


def content_fingerprint(path: Path) -> str:
    """A sha256 of a file's content, or of a folder's files (relative names, sizes, contents; hidden
    paths such as a download cache's metadata left out). A file over 2 MiB contributes its size and
    its first and last MiB only, so a 20 GB weights folder is fingerprinted in about a second; another
    checkpoint of the same network differs in its first MiB (safetensors header offsets, first tensor)
    and its last, and the config and index files are hashed whole."""
    path = Path(path).expanduser()
    if path.is_file():
        files = [(path, "")]
    else:
        files = [
            (file, file.relative_to(path).as_posix())
            for file in sorted(path.rglob("*"))
            if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
        ]
    digest = hashlib.sha256()
    for file, name in files:
        size = file.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            if size <= 2 * SAMPLE_BYTES:
                digest.update(handle.read())
            else:
                digest.update(handle.read(SAMPLE_BYTES))
                handle.seek(-SAMPLE_BYTES, os.SEEK_END)
                digest.update(handle.read())
    return digest.hexdigest()
