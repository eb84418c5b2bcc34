#!/usr/bin/env python3
"""A stand-in for `python -m experiments.run` that keeps its contract in milliseconds, for the tests
of the job plumbing (locks, arrays, requeues) without training:

    stand_in_run.py RUN_DIR ok|fail|wait

Each start appends {"restart": SLURM_RESTART_COUNT, "lock": the lock's job id} to RUN_DIR/starts.jsonl.
``ok`` completes (exit 0); ``fail`` records an error in status.json and exits 3; ``wait`` runs until
SIGUSR1 or SIGTERM, then writes a checkpoint and exits 75 (experiments.run.PREEMPTED_EXIT), and a
later start finds the checkpoint and completes: the resume.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def status(run_dir: Path, **state) -> None:
    (run_dir / "status.json").write_text(json.dumps(state))


def main() -> int:
    run_dir, mode = Path(sys.argv[1]), sys.argv[2]
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir.parent / "locks" / f"{run_dir.name}.lock"
    holder = json.loads(lock.read_text())["job_id"] if lock.exists() else None
    start = {"restart": os.environ.get("SLURM_RESTART_COUNT"), "lock": holder}
    with open(run_dir / "starts.jsonl", "a") as handle:
        handle.write(json.dumps(start) + "\n")
    if mode == "fail":
        status(run_dir, state="failed", error="ValueError: a planted failure")
        return 3
    if mode == "ok" or (run_dir / "checkpoint").exists():
        status(run_dir, state="complete")
        return 0
    stop = []
    for number in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.append(True))
    status(run_dir, state="running")
    (run_dir / "waiting").touch()
    while not stop:
        time.sleep(0.05)
    (run_dir / "checkpoint").touch()
    status(run_dir, state="preempted")
    return 75


if __name__ == "__main__":
    sys.exit(main())
