"""Where a sweep's jobs run: one after another on this machine, or as Slurm job arrays through submitit.

A job is one run: ``RunJob`` takes the run's lock (experiments.run_locks), starts the run's command
(``python -m experiments.run --config ...``, or through experiments.launch for several processes)
as a child in its own process group with its output appended to ``<sweep>/logs/<run>.log``, waits,
and releases the lock. The same object is the local job and the submitit function, so both paths
run the same code.

Slurm. Jobs that need the same GPUs form one job array (``executor.batch()``); partition, account,
QoS, constraint, time limit, memory, CPUs and the array's parallelism come from the sweep file's
``cluster:`` section, and any of them from the environment, which wins: ``RSM_SLURM_<FIELD>`` for
each field of ``ClusterConfig`` (e.g. RSM_SLURM_PARTITION, RSM_SLURM_ACCOUNT, RSM_SLURM_TIMEOUT_MIN).
Slurm sends SIGUSR1 ``signal_delay_min`` minutes before the time limit. submitit catches it and calls
``RunJob.checkpoint``, which forwards SIGUSR1 to the run's process group (the run finishes its epoch,
writes a checkpoint and exits 75: experiments.run.PREEMPTED_EXIT), waits for it, and returns the same
job for submitit to requeue; the requeued job keeps its job id, so it keeps the run's lock, and
reruns the same command, which resumes. A run that exits 75 on its own (SIGTERM from a preemption)
requeues itself with ``scontrol requeue``. The launchers between the job and a multi-process run's
workers (experiments.launch, accelerate) start with SIGUSR1 ignored, so the signal Slurm sends to
every process of the job step stops only the workers, which handle it.

This module is what a Slurm job imports to run (its ``RunJob`` is pickled by reference), so it imports
neither torch nor the harness.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from submitit.helpers import Checkpointable, DelayedSubmission

from experiments import run_locks
from rsm_core.config import ConfigError, require

# experiments.run's (not imported: this module stays light): its exit code after a requested stop, and
# the file in the run directory that requests one
PREEMPTED_EXIT = 75
STOP_FILE = "stop.request"
PREEMPT_SIGNAL = "USR1"  # what experiments.run stops on (besides SIGTERM); submitit's default is USR2
ENV_PREFIX = "RSM_SLURM_"


@dataclass
class ClusterConfig:
    """The Slurm settings of a sweep's jobs; ``RSM_SLURM_<FIELD>`` in the environment wins over each."""

    partition: str = ""  # "" = the cluster's default
    account: str = ""
    qos: str = ""
    constraint: str = ""  # e.g. "h100|a100" (sbatch --constraint)
    # GPUs of one node: a job needing more (a run's processes) is refused before anything is submitted
    gpus_per_node: int = 8
    timeout_min: int = 24 * 60  # each job's time limit; a run that needs longer is requeued and resumes
    cpus_per_task: int = 0  # 0 = the cluster's default
    mem_gb: int = 0  # 0 = the cluster's default
    signal_delay_min: int = 10  # SIGUSR1 this long before the time limit: time to finish an epoch
    array_parallelism: int = 64  # array tasks running at once
    max_requeues: int = 20  # time-limit requeues per job (preemptions do not count)

    def __post_init__(self) -> None:
        for name in ("timeout_min", "signal_delay_min", "array_parallelism"):
            require(getattr(self, name) >= 1, f"cluster.{name}", "must be at least 1")
        for name in ("gpus_per_node", "cpus_per_task", "mem_gb", "max_requeues"):
            require(getattr(self, name) >= 0, f"cluster.{name}", "must not be negative")
        require(
            self.signal_delay_min < self.timeout_min,
            "cluster.signal_delay_min",
            f"{self.signal_delay_min} min is not shorter than the time limit ({self.timeout_min} min)",
        )


def with_environment(config: ClusterConfig, environ: dict[str, str] | None = None) -> ClusterConfig:
    """``config`` with every ``RSM_SLURM_<FIELD>`` set in the environment applied (the environment wins)."""
    environ = dict(os.environ) if environ is None else environ
    changes: dict[str, str | int] = {}
    for spec in fields(config):
        name = f"{ENV_PREFIX}{spec.name.upper()}"
        if name not in environ:
            continue
        kind = type(getattr(config, spec.name))
        try:
            changes[spec.name] = kind(environ[name])
        except ValueError:
            raise ConfigError(
                f"{name}={environ[name]!r} is not a {kind.__name__} (cluster.{spec.name}); fix or unset it"
            ) from None
    return replace(config, **changes)


def environment_names() -> list[str]:
    """The environment variables that override the cluster settings (for the docs and --help)."""
    return [f"{ENV_PREFIX}{spec.name.upper()}" for spec in fields(ClusterConfig)]


# ------------------------------------------------------------------------------------------------
# One job
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs to run one run, as plain data (pickled into a Slurm job)."""

    run: str  # the run's name, its directory under the sweep
    method: str
    seed: int
    group: str  # the figure or model family it belongs to (reports group by it)
    gpus: int  # 0: a CPU job
    processes: int
    sweep_dir: Path
    command: tuple[str, ...]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)  # added to the job's environment

    @property
    def run_dir(self) -> Path:
        return self.sweep_dir / self.run

    @property
    def config_file(self) -> Path:
        return self.sweep_dir / "jobs" / f"{self.run}.yaml"

    @property
    def submitted_file(self) -> Path:
        return self.sweep_dir / "jobs" / f"{self.run}.submitted.json"

    @property
    def log(self) -> Path:
        return self.sweep_dir / "logs" / f"{self.run}.log"

    @property
    def lock(self) -> Path:
        return self.sweep_dir / "locks" / f"{self.run}.lock"


Outcome = Literal["complete", "already complete", "running elsewhere", "failed", "preempted", "submitted"]


@dataclass(frozen=True)
class JobResult:
    run: str
    outcome: Outcome
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        return f"{self.run}: {self.outcome}" + (f" ({self.detail})" if self.detail else "")


class RunFailed(RuntimeError):
    """A run exited with an error (raised in the job, so Slurm records the job as FAILED)."""

    def __init__(self, result: JobResult) -> None:
        self.result = result
        super().__init__(result.line())


def run_state(run_dir: Path) -> dict:
    """A run directory's status.json ({} when there is none or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def failure_detail(spec: JobSpec, code: int) -> str:
    """Why a run failed: its exit code (or signal), the error status.json recorded, the log."""
    how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
    error = run_state(spec.run_dir).get("error") or "no error in status.json: it died before writing one"
    return f"{how}; {error}; log {spec.log}"


def _ignore_preempt_signal() -> None:
    """In the job's child before it starts: the launchers between the job and a run's workers ignore
    SIGUSR1 (Python's default would end them); the run's own processes install their handler."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class _Child:
    """A run's process group. Waiting polls an exit code set by a thread, never a lock the waiting
    thread holds, so a signal handler (submitit's checkpoint) can wait for the child too."""

    def __init__(self, command: tuple[str, ...], cwd: Path, env: dict[str, str], log) -> None:
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: our signal reaches every process of it
            preexec_fn=_ignore_preempt_signal,
        )
        self.code: int | None = None
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        self.code = self.process.wait()

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.code is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(poll)
        return self.code

    def signal(self, number: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # the whole group has ended
            os.killpg(self.process.pid, number)

    def stop(self, stop_file: Path, grace_s: float, say: Callable[[str], None]) -> int:
        """Ask the run to stop at its epoch's end (it checkpoints and exits 75): SIGUSR1 to every
        process, and the run's stop file for any process that had no handler yet; after ``grace_s``
        seconds terminate it (it resumes from its last checkpoint)."""
        if self.code is None and stop_file.parent.is_dir():
            stop_file.touch()
        self.signal(signal.SIGUSR1)
        if self.wait(grace_s) is None:
            say(f"the run did not stop within {grace_s:.0f} s; terminating it")
            self.signal(signal.SIGTERM)
            if self.wait(30) is None:
                self.signal(signal.SIGKILL)
        return self.wait()  # type: ignore[return-value]


class RunJob(Checkpointable):
    """One run as a job: called here by a local sweep, or by submitit in a Slurm job, where
    ``checkpoint`` is its preemption hook."""

    def __init__(self, spec: JobSpec, grace_s: float, say: Callable[[str], None] = print) -> None:
        self.spec, self.grace_s, self.say = spec, grace_s, say
        self._child: _Child | None = None
        self._requeued = False

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "grace_s": self.grace_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["spec"], state["grace_s"])

    def __call__(self) -> JobResult:
        spec, job_id = self.spec, run_locks.current_job_id()
        try:
            run_locks.acquire(spec.lock, job_id, say=self.say)
        except run_locks.LockBusy as busy:
            return JobResult(spec.run, "running elsewhere", str(busy))
        started = time.monotonic()
        try:
            if run_state(spec.run_dir).get("state") == "complete":
                return JobResult(spec.run, "already complete")
            code = self._train(job_id)
            seconds = time.monotonic() - started
            if code == 0:
                return JobResult(spec.run, "complete", seconds=seconds)
            # several processes: the launcher exits 1 when its workers exit 75; status.json tells
            if code != PREEMPTED_EXIT and run_state(spec.run_dir).get("state") != "preempted":
                raise RunFailed(JobResult(spec.run, "failed", failure_detail(spec, code), seconds))
            if not self._requeued and run_locks.in_slurm_job():
                self._requeue_self(job_id)
            how = "requeued; it resumes" if self._requeued else "rerun the sweep to resume it"
            return JobResult(spec.run, "preempted", f"checkpointed and stopped (exit {code}); {how}", seconds)
        finally:
            if not self._requeued:
                run_locks.release(spec.lock, job_id)

    def _train(self, job_id: str) -> int:
        spec = self.spec
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log, "ab") as log:
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            header = f"=== {now} job {job_id} starts: {shlex.join(spec.command)}\n"
            log.write(header.encode())
            log.flush()
            self._child = _Child(spec.command, spec.cwd, {**os.environ, **spec.env}, log)
            try:
                return self._child.wait(poll=0.5)  # type: ignore[return-value]
            except KeyboardInterrupt:  # a local sweep's Ctrl-C or SIGTERM: stop the run cleanly, then stop
                self.say(f"{spec.run}: stopping at the end of its epoch (Ctrl-C again to kill it)")
                try:
                    self._child.stop(self.spec.run_dir / STOP_FILE, self.grace_s, self.say)
                except KeyboardInterrupt:
                    self._child.signal(signal.SIGKILL)
                raise

    def checkpoint(self) -> DelayedSubmission | None:
        """submitit's preemption hook (Slurm's SIGUSR1 before the time limit): stop the run at its
        epoch's end, then hand submitit the same job to requeue (None: the run has failed, there is
        nothing to resume)."""
        if self._child is not None and self._child.code not in (None, 0, PREEMPTED_EXIT):
            return None
        self._requeued = True
        if self._child is not None:
            code = self._child.stop(self.spec.run_dir / STOP_FILE, self.grace_s, self.say)
            self.say(f"{self.spec.run}: stopped with exit {code}; requeueing")
        return DelayedSubmission(RunJob(self.spec, self.grace_s))

    def _requeue_self(self, job_id: str) -> None:
        """The run stopped on a signal submitit did not handle (SIGTERM of a preemption): requeue the
        job so it resumes; on success this process ends as submitit's own requeue does."""
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode == 0:
            self._requeued = True
            self.say(f"{self.spec.run}: preempted; requeued job {job_id}")
            raise SystemExit(PREEMPTED_EXIT)
        self.say(f"{self.spec.run}: scontrol requeue {job_id} failed: {result.stderr.strip()}")


def grace_seconds(config: ClusterConfig) -> float:
    """How long a stopping run may take to finish its epoch: the signal's lead time less a minute
    for the requeue (at least 30 s)."""
    return max(config.signal_delay_min * 60 - 60, 30)


# ------------------------------------------------------------------------------------------------
# Slurm through submitit
# ------------------------------------------------------------------------------------------------


def _submitit():
    """submitit, with the preemption signal experiments.run handles (set before any script is made)."""
    import submitit
    from submitit.core import job_environment

    job_environment.JobEnvironment.USR_SIG = PREEMPT_SIGNAL
    return submitit


def slurm_parameters(config: ClusterConfig, gpus: int, name: str) -> dict:
    """sbatch parameters of one job array (submitit's SlurmExecutor names)."""
    params: dict = {
        "job_name": name,
        "time": config.timeout_min,
        "signal_delay_s": config.signal_delay_min * 60,
        "array_parallelism": config.array_parallelism,
        "stderr_to_stdout": True,
        # the job's submitit catches the signal Slurm sends (submitit reads this when it starts)
        "setup": [f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPT_SIGNAL}"],
    }
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(config, key):
            params[key] = getattr(config, key)
    if gpus:
        params["gpus_per_node"] = gpus
    if config.cpus_per_task:
        params["cpus_per_task"] = config.cpus_per_task
    if config.mem_gb:
        params["mem"] = f"{config.mem_gb}GB"
    return params


def slurm_executor(folder: Path, params: dict, max_requeues: int, render_only: bool = False):
    """A submitit SlurmExecutor; ``render_only``: one that can only write scripts, on a machine
    without srun (DRY_RUN on a laptop)."""
    submitit = _submitit()

    class ScriptOnly(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2

    executor = (ScriptOnly if render_only else submitit.SlurmExecutor)(folder, max_num_timeout=max_requeues)
    executor.update_parameters(**params)
    return executor


def sbatch_script(folder: Path, params: dict, count: int) -> str:
    """The script submitit submits for an array of ``count`` jobs with ``params`` (as its
    SlurmExecutor writes it for ``executor.batch()``)."""
    executor = slurm_executor(folder, params, max_requeues=0, render_only=True)
    if count > 1:
        executor.parameters["map_count"] = count
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def submit(folder: Path, params: dict, jobs: list[RunJob], max_requeues: int) -> list:
    """Submit ``jobs`` as one array (one plain job if there is one); returns submitit's jobs."""
    executor = slurm_executor(folder, params, max_requeues)
    with executor.batch():
        submitted = [executor.submit(job) for job in jobs]
    return submitted


def collect(spec: JobSpec, job) -> JobResult:
    """A finished submitit job's result; a failure's detail is the job's RunFailed line, or Slurm's
    state and the run's status.json when the job ended without a result (killed, out of memory)."""
    error = job.exception()
    if error is None:
        return job.result()
    text = str(error)
    found = re.search(rf"{RunFailed.__name__}: {re.escape(spec.run)}: failed \((.*)\)", text)
    if found:
        return JobResult(spec.run, "failed", found.group(1))
    state = slurm_states([job.job_id]).get(job.job_id, "unknown")
    status = run_state(spec.run_dir)
    detail = f"Slurm state {state}; {status.get('error', 'no error in status.json')}; log {spec.log}"
    return JobResult(spec.run, "failed", detail)


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job id ("123" or array task "123_4"): sacct's, then squeue's where it
    lists the job; {} without Slurm."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    states: dict[str, str] = {}
    commands = (
        ["sacct", "--noheader", "--parsable2", "--format", "JobID,State", "--jobs", ",".join(ids)],
        ["squeue", "--noheader", "--array", "--format", "%i|%T", "--jobs", ",".join(ids)],
    )
    for command in commands:
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        for line in result.stdout.splitlines():
            job, _, state = line.strip().partition("|")
            if job in ids and state:
                states[job] = state.split()[0]  # "CANCELLED by 123" -> CANCELLED
    return states
