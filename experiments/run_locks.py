"""One job per run at a time: ``<sweep>/locks/<run>.lock``, created exclusively, naming the job that holds it.

Two sweeps launched on one sweep directory (two terminals, or a rerun while the first sweep's jobs are
still queued) must not train the same run twice. A job takes its run's lock before it starts the
run and releases it when the run ends; a job that finds the lock held by another live job skips the
run ("running under job <id>"). The lock file holds {"job_id", "host", "pid", "started"}:

- job id: ``<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>`` in a Slurm array task, ``SLURM_JOB_ID`` in
  a plain Slurm job, else (a local sweep, even one inside an allocation) ``local-<pid>`` of the sweep;
- a lock is stale, and taken over with a message, when its holder is a local job on this host whose
  process is gone, or a Slurm job that squeue no longer lists (ended, cancelled). A local job of
  another host, or a Slurm job when squeue cannot be asked, counts as live: skipping is the safe side;
- a lock held under this job's own id is this job's (a requeued Slurm job keeps its id and its lock).

Check-and-take happens under an flock on ``<sweep>/locks/.guard``, so two jobs that find the same
stale lock cannot both take it; the exclusive create (O_EXCL) is the lock itself.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

LOCAL_PREFIX = "local-"


def in_slurm_job() -> bool:
    """Whether this process is a sweep's Slurm job (submitit's script exports SUBMITIT_EXECUTOR); a
    local sweep started inside an allocation (salloc) is not."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def current_job_id() -> str:
    """This process's job id: the Slurm array task, the Slurm job, or ``local-<pid>``."""
    if not in_slurm_job():
        return f"{LOCAL_PREFIX}{os.getpid()}"
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ["SLURM_JOB_ID"]


@dataclass(frozen=True)
class Holder:
    """Who holds a run's lock."""

    job_id: str
    host: str
    pid: int
    started: str

    @classmethod
    def this_process(cls, job_id: str) -> Holder:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(job_id, socket.gethostname(), os.getpid(), now)


def slurm_lists(job_id: str) -> bool | None:
    """Whether squeue lists ``job_id`` (pending, running, requeued), or None when squeue cannot tell."""
    try:
        result = subprocess.run(
            ["squeue", "--noheader", "--jobs", job_id, "--format", "%i"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        # squeue fails on an id it no longer knows ("Invalid job id specified"): the job is long gone
        return False if "invalid job id" in result.stderr.lower() else None
    return bool(result.stdout.strip())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def stale_reason(holder: Holder, listed: Callable[[str], bool | None] = slurm_lists) -> str | None:
    """Why ``holder`` no longer runs (so its lock may be taken), or None when it may still run."""
    if holder.job_id.startswith(LOCAL_PREFIX):
        if holder.host == socket.gethostname() and not pid_alive(holder.pid):
            return f"its process {holder.pid} on {holder.host} is gone"
        return None
    if listed(holder.job_id) is False:
        return f"Slurm job {holder.job_id} is no longer in the queue (squeue)"
    return None


def read_holder(path: Path) -> Holder | None:
    """The lock's holder, or None if there is no lock (or only an unreadable one, e.g. written by a
    job killed mid-write: such a lock protects nothing)."""
    try:
        return Holder(**json.loads(Path(path).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


class LockBusy(Exception):
    """The run is locked by another live job."""

    def __init__(self, holder: Holder) -> None:
        self.holder = holder
        super().__init__(f"running under job {holder.job_id} (host {holder.host}, since {holder.started})")


@contextmanager
def _guarded(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".guard", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def _create(path: Path, holder: Holder) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(asdict(holder)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def acquire(
    path: Path,
    job_id: str,
    say: Callable[[str], None] = print,
    listed: Callable[[str], bool | None] = slurm_lists,
) -> Holder:
    """Take the lock at ``path`` for ``job_id``; raises LockBusy if another live job holds it. A stale
    lock, or this job's own (a requeued job), is taken over; ``say`` tells which and why."""
    path = Path(path)
    with _guarded(path.parent):
        holder = read_holder(path)
        if path.exists():
            if holder is None:
                say(f"{path.stem}: taking over an unreadable lock {path} (its job died while writing it)")
            elif holder.job_id != job_id:
                reason = stale_reason(holder, listed)
                if reason is None:
                    raise LockBusy(holder)
                say(f"{path.stem}: taking over the lock of job {holder.job_id}: {reason}")
            path.unlink()
        mine = Holder.this_process(job_id)
        _create(path, mine)
        return mine


def release(path: Path, job_id: str) -> None:
    """Remove the lock if ``job_id`` holds it (a lock another job took over is left alone)."""
    path = Path(path)
    with _guarded(path.parent):
        holder = read_holder(path)
        if holder is not None and holder.job_id == job_id:
            path.unlink()


def live_holder(path: Path, listed: Callable[[str], bool | None] = slurm_lists) -> Holder | None:
    """The job running the run at ``path``'s lock, or None if unlocked or the lock is stale."""
    holder = read_holder(path)
    if holder is None or stale_reason(holder, listed) is not None:
        return None
    return holder
