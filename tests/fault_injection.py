"""Run one training command with one injected fault: the wrapper the fault-injection tests start.

    python tests/fault_injection.py FAULT [--epoch E] [--geneval] -- vgg-flow --scale smoke --runs-dir D ...

The arguments after ``--`` go to ``experiments.run``. The fault fires once, in training epoch ``E``
(default 2, so that a checkpoint exists to resume from), at the moment it names:

  none               no fault: the uninterrupted run, and the rerun that resumes after a fault
  kill-reward        SIGKILL at the epoch's first reward call
  kill-eval          SIGKILL as the epoch's evaluation starts
  kill-checkpoint    SIGKILL inside the epoch's checkpoint write: the first file's bytes are in its temp
                     file, not yet renamed into place
  kill-commit        SIGKILL as the epoch's checkpoint manifest is about to be renamed into place
  enospc-metrics     the disk fills while the epoch's metrics row is written: half the row lands, then
                     the write raises ENOSPC (as a real full disk does)
  enospc-checkpoint  the same while the epoch's first checkpoint file is written
  geneval-down | geneval-slow | geneval-garbage | geneval-flaky
                     (with --geneval) at the epoch's first reward call the GenEval server stops, stalls
                     beyond the client's timeout, answers garbage, or fails twice and then answers

--geneval scores the run with the geneval-server reward (``--set reward=geneval-server``) and serves
tests/fake_geneval_server.py for it in this process. The client finds it through
$TEMPFLOW_GENEVAL_REWARD_URL, so the config keeps geneval_url empty and a rerun's config matches
although the port differs; it gives up in seconds (``CLIENT``).

The moments are found through the run's own calls: ``RunRecord.log`` tells which epoch's row was
logged last, so epoch E's reward calls and evaluation come after row E - 1 and its checkpoint after
row E. The tests import the helpers below to drive and inspect the same faults.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import child_env
from fake_geneval_server import FakeGenEvalServer

from experiments import run as run_module
from experiments.cli import run as run_cli
from reward_models.geneval_server import URL_ENV, GenEvalServerReward
from rsm_core import records

KILLS = ("kill-reward", "kill-eval", "kill-checkpoint", "kill-commit")
DISK_FULL = ("enospc-metrics", "enospc-checkpoint")
SERVER_FAULTS = ("geneval-down", "geneval-slow", "geneval-garbage", "geneval-flaky")
FAULTS = ("none", *KILLS, *DISK_FULL, *SERVER_FAULTS)
# the run's GenEval client: 3 attempts, 1 s each (the fake answers in milliseconds), so a dead server
# fails a test in seconds
CLIENT = {"timeout": 1.0, "retries": 2, "backoff": 0.05}
SLOW_SECONDS = 3 * CLIENT["timeout"]  # a stalled server answers only after the client gave up
CHECKPOINT_DIR = "checkpoints"  # rsm_core.checkpoints.folder: every checkpoint file lies under it
MANIFEST = "manifest.json"


def killed() -> None:
    """Die at once, as the OOM killer or a cluster's hard limit does: nothing gets to clean up."""
    os.kill(os.getpid(), signal.SIGKILL)


class FullDisk:
    """A file handle on a disk that fills up: ``write`` lands the first half of its bytes, then
    raises ENOSPC with the OS's message (no file name, as a real ``write`` reports it)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def write(self, data: bytes | str) -> int:
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()


class Watched:
    """A reward that calls ``before_call`` before each call, otherwise the reward itself."""

    def __init__(self, reward: Any, before_call: Callable[[], None]) -> None:
        self._reward, self._before_call = reward, before_call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._before_call()
        return self._reward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reward, name)


def go_bad(server: FakeGenEvalServer, fault: str) -> None:
    """Turn a serving fake GenEval server into the ``fault`` of ``SERVER_FAULTS``."""
    if fault == "geneval-down":
        server.__exit__()  # the port closes: connections are refused
    elif fault == "geneval-slow":
        server.delay = SLOW_SECONDS
    elif fault == "geneval-garbage":
        server.malformed = "garbage"
    elif fault == "geneval-flaky":
        server.fail_first = server.requests + CLIENT["retries"]  # the last attempt gets an answer
    else:
        raise ValueError(f"not a server fault: {fault!r}; choose one of {SERVER_FAULTS}")


def fast_client(reward: Any) -> Any:
    """``reward`` with ``CLIENT``'s timeout and retries if it is a GenEval server client."""
    if isinstance(reward, GenEvalServerReward):
        for key, value in CLIENT.items():
            setattr(reward, key, value)
    return reward


class Injector:
    """Patches the run's moments (module attributes, in this process only) and fires ``fault`` once
    in epoch ``epoch``."""

    def __init__(self, fault: str, epoch: int, server: FakeGenEvalServer | None) -> None:
        self.fault, self.epoch, self.server = fault, epoch, server
        self.logged: int | None = None  # the epoch of the last logged metrics row
        self.fired = False

    def due(self, fault: str, after_row: int) -> bool:
        """Whether ``fault`` is the one to inject and its moment has come (row ``after_row`` logged)."""
        if self.fault != fault or self.fired or self.logged != after_row:
            return False
        self.fired = True
        return True

    def install(self) -> None:
        original_log = records.RunRecord.log
        original_write = records.atomic_write_bytes
        original_replace = os.replace
        original_rewards = run_module.reward_functions
        original_build_arm = run_module.build_arm

        def log(record: Any, row: dict[str, Any]) -> None:
            if self.due("enospc-metrics", self.epoch - 1):
                with full_disk(records, "open"):
                    original_log(record, row)
            else:
                original_log(record, row)
            self.logged = row["epoch"]

        def atomic_write_bytes(path: Path, data: bytes) -> None:
            if CHECKPOINT_DIR in Path(path).parts and self.due("enospc-checkpoint", self.epoch):
                with full_disk(os, "fdopen"):
                    original_write(path, data)
            else:
                original_write(path, data)

        def replace(source: Any, target: Any, **kwargs: Any) -> None:
            if CHECKPOINT_DIR in Path(target).parts:
                if self.due("kill-checkpoint", self.epoch):
                    killed()
                if Path(target).name == MANIFEST and self.due("kill-commit", self.epoch):
                    killed()
            original_replace(source, target, **kwargs)

        def before_reward_call() -> None:
            if self.due("kill-reward", self.epoch - 1):
                killed()
            if self.fault in SERVER_FAULTS and self.due(self.fault, self.epoch - 1):
                go_bad(self.server, self.fault)

        def reward_functions(*args: Any, **kwargs: Any) -> dict[str, Any]:
            rewards = original_rewards(*args, **kwargs)
            return {name: Watched(fast_client(r), before_reward_call) for name, r in rewards.items()}

        def build_arm(*args: Any, **kwargs: Any) -> Any:
            arm = original_build_arm(*args, **kwargs)
            evaluate = arm.evaluate

            def watched_evaluate(*eval_args: Any, **eval_kwargs: Any) -> Any:
                if self.due("kill-eval", self.epoch - 1):
                    killed()
                return evaluate(*eval_args, **eval_kwargs)

            arm.evaluate = watched_evaluate
            return arm

        records.RunRecord.log = log
        records.atomic_write_bytes = atomic_write_bytes
        os.replace = replace
        run_module.reward_functions = reward_functions
        run_module.build_arm = build_arm


@contextmanager
def full_disk(module: Any, opener: str) -> Iterator[None]:
    """While inside: files opened through ``module.<opener>`` (``open`` or ``os.fdopen``) sit on a
    full disk (``FullDisk``)."""
    import builtins

    own = opener in vars(module)  # else it is the builtin, shadowed by a module attribute meanwhile
    original = getattr(module, opener) if own else getattr(builtins, opener)
    setattr(module, opener, lambda *args, **kwargs: FullDisk(original(*args, **kwargs)))
    try:
        yield
    finally:
        if own:
            setattr(module, opener, original)
        else:
            delattr(module, opener)


# ------------------------------------------------------------------------------------------------
# For the tests: start the wrapper, and read what a run left behind
# ------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
RUN = "run"  # the run directory's name under each test's runs directory


# the smoke scale made smaller where it costs seconds, on the same code path: the first-order arm
# samples 3 steps; the zeroth-order one branches 2 children at 3 of its 9 trained steps and scores
# them 2 images per reward call (3 calls an epoch)
SMALL = {
    "vgg-flow": ["arm.sampler_steps=3"],
    "tempflow-grpo": ["arm.profile=sparse", "arm.sparse_k=2", "arm.sparse_stride=4", "arm.decode_chunk=2"],
}


def launch(fault: str, runs: Path, method: str, *, epochs: int = 2, geneval: bool = False):
    """``method``'s small smoke run (``SMALL``) of ``epochs`` epochs in a child process with ``fault`` in
    its last epoch; the completed process (its output captured as text)."""
    command = [sys.executable, str(Path(__file__)), fault, "--epoch", str(epochs)]
    command += ["--geneval"] if geneval else []
    command += ["--", method, "--scale", "smoke", "--runs-dir", str(runs), "--name", RUN]
    for override in [f"loop.epochs={epochs}", *SMALL[method]]:
        command += ["--set", override]
    return subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True)


def untimed(rows: list[dict]) -> list[dict]:
    """Metrics rows without what measures the machine rather than the method."""
    from experiments.smoke_reference import UNTIMED  # imports every figure: not in the wrapper's way

    return [{k: v for k, v in row.items() if not k.startswith(UNTIMED)} for row in rows]


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def metrics_lines(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl parsed: a partial row (a write cut short) fails here."""
    text = (run_dir / "metrics.jsonl").read_text()
    assert not text or text.endswith("\n"), f"metrics.jsonl ends in a partial row: {text[-80:]!r}"
    return [json.loads(line) for line in text.splitlines()]


def temp_files(run_dir: Path) -> list[str]:
    """Files an interrupted write left behind (atomic writes' temp files, downloads' parts)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.suffix in (".tmp", ".part"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("fault", choices=FAULTS)
    parser.add_argument("--epoch", type=int, default=2, help="the training epoch (1-based) the fault hits")
    parser.add_argument("--geneval", action="store_true", help="score with a fake GenEval server")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, run_args = parser.parse_args(argv[:split]), argv[split + 1 :]
    if args.fault in SERVER_FAULTS and not args.geneval:
        parser.error(f"{args.fault} needs --geneval (a fake server to break)")
    server = FakeGenEvalServer() if args.geneval else None
    if server is not None:
        os.environ[URL_ENV] = server.__enter__()
        run_args += ["--set", "reward=geneval-server"]
    Injector(args.fault, args.epoch, server).install()
    try:
        run_cli(lambda _: run_module.main(run_args))
    finally:
        if server is not None:
            server.__exit__()


if __name__ == "__main__":
    sys.exit(main())
