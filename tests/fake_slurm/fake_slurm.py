#!/usr/bin/env python3
"""A stand-in for Slurm's commands, for the tests of the Slurm path: sbatch, squeue, sacct, scancel,
scontrol and srun on PATH (the shims next to this file) run ``fake_slurm.py <command> ARGS``.

Every call is recorded as one JSON line in ``$FAKE_SLURM_DIR/calls.jsonl`` (command, arguments, the
caller's SLURM_* variables). ``sbatch`` keeps a copy of the script, gives the job (and each task of an
``--array``) a state file under ``$FAKE_SLURM_DIR/jobs/``, prints "Submitted batch job <id>" and
leaves a detached runner that runs the tasks one after another on this machine, as Slurm would on a
node: ``bash script`` with SLURM_JOB_ID, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID and
SLURM_RESTART_COUNT set. ``srun`` (which submitit's script calls) redirects to its --output/--error,
records its pid as the job step's and execs the command. ``scancel --signal SIG <job>`` signals the
step's process (real Slurm signals every process of the step), ``scancel <job>`` cancels it;
``scontrol requeue <job>`` makes the runner run the task again after it ends, with
SLURM_RESTART_COUNT + 1; ``squeue`` lists pending and running tasks; ``sacct`` every task's state.
Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "/tmp/fake_slurm"))
JOBS = STATE / "jobs"
LIVE = {"PENDING", "RUNNING", "REQUEUED"}


# ------------------------------------------------------------------------------------------------
# State: one JSON file per task, updated under an exclusive lock
# ------------------------------------------------------------------------------------------------


def _path(key: str) -> Path:
    return JOBS / f"{key}.json"


def read(key: str) -> dict:
    return json.loads(_path(key).read_text())


def update(key: str, **changes) -> dict:
    import fcntl

    with open(STATE / ".lock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        state = read(key) if _path(key).exists() else {}
        state.update(changes)
        tmp = _path(key).with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(_path(key))
        return state


def tasks() -> list[str]:
    return sorted((p.stem for p in JOBS.glob("*.json")), key=lambda k: [int(x) for x in k.split("_")])


def matching(ids: list[str]) -> list[str]:
    """Task keys named by ``ids`` ("1000" names every task of job 1000; "1000_2" one task)."""
    chosen = []
    for key in tasks():
        base = key.split("_")[0]
        if not ids or key in ids or base in ids:
            chosen.append(key)
    return chosen


def record(command: str, args: list[str]) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}
    with open(STATE / "calls.jsonl", "a") as handle:
        handle.write(json.dumps({"command": command, "args": args, "env": env}) + "\n")


def options(args: list[str], flags: tuple[str, ...] = ()) -> tuple[dict[str, list[str]], list[str]]:
    """``--key=value``, ``--key value`` and ``-k value`` options (``flags`` take no value), and the
    remaining arguments."""
    found: dict[str, list[str]] = {}
    rest = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and arg not in flags:
            key, sep, value = arg.lstrip("-").partition("=")
            if not sep:
                i += 1
                value = args[i]
            found.setdefault(key, []).append(value)
        elif arg in flags:
            found.setdefault(arg.lstrip("-"), []).append("")
        else:
            rest.append(arg)
        i += 1
    return found, rest


def expand(pattern: str, env: dict[str, str]) -> str:
    return (
        pattern.replace("%A", env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"]))
        .replace("%a", env.get("SLURM_ARRAY_TASK_ID", "0"))
        .replace("%j", env["SLURM_JOB_ID"])
        .replace("%t", "0")
    )


# ------------------------------------------------------------------------------------------------
# The commands
# ------------------------------------------------------------------------------------------------


def sbatch(args: list[str]) -> int:
    script = Path(args[-1]).read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, flags=re.MULTILINE))
    counter = STATE / "next_id"
    job_id = int(counter.read_text()) if counter.exists() else 1000
    counter.write_text(str(job_id + 1))
    JOBS.mkdir(parents=True, exist_ok=True)
    (STATE / "scripts").mkdir(exist_ok=True)
    (STATE / "scripts" / f"{job_id}.sh").write_text(script)
    array = directives.get("array", "")
    if array:
        last = int(array.split("%")[0].split("-")[1])
        keys = [f"{job_id}_{task}" for task in range(last + 1)]
    else:
        keys = [str(job_id)]
    for key in keys:
        update(key, state="PENDING", restarts=0, requeue=False, step_pid=None, exit_code=None)
    runner_log = open(STATE / f"runner-{job_id}.log", "a")  # noqa: SIM115 (the runner keeps it)
    subprocess.Popen(
        [sys.executable, __file__, "_runner", str(job_id), directives.get("output", "")],
        stdout=runner_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    print(f"Submitted batch job {job_id}")
    return 0


def runner(args: list[str]) -> int:
    """Run every task of a job, one after another, rerunning a task that was requeued."""
    job_id, output = args[0], args[1]
    script = STATE / "scripts" / f"{job_id}.sh"
    for key in matching([job_id]):
        while True:
            state = read(key)
            if state["state"] == "CANCELLED":
                break
            env = {
                **os.environ,
                "SLURM_JOB_ID": key.replace("_", "0"),
                "SLURM_RESTART_COUNT": str(state["restarts"]),
            }
            if "_" in key:
                env |= {"SLURM_ARRAY_JOB_ID": job_id, "SLURM_ARRAY_TASK_ID": key.split("_")[1]}
            env |= {"SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "1"}
            update(key, state="RUNNING", requeue=False)
            out = expand(output, env) if output else os.devnull
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as log:
                code = subprocess.run(
                    ["bash", str(script)], env=env, stdout=log, stderr=subprocess.STDOUT
                ).returncode
            state = read(key)
            if state["requeue"]:
                update(key, state="PENDING", restarts=state["restarts"] + 1, step_pid=None)
                continue
            if state["state"] != "CANCELLED":
                update(key, state="COMPLETED" if code == 0 else "FAILED", exit_code=code, step_pid=None)
            break
    return 0


def srun(args: list[str]) -> int:
    command, opts = list(args), {}
    while command and command[0].startswith("-"):
        arg = command.pop(0)
        if arg == "--unbuffered":
            continue
        key, sep, value = arg.lstrip("-").partition("=")
        opts[key] = value if sep else command.pop(0)
    env = dict(os.environ)
    key = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_JOB_ID" in env else None
    key = key or next(k for k in tasks() if k.replace("_", "0") == env["SLURM_JOB_ID"])
    update(key, step_pid=os.getpid())
    os.environ.update({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_STEP_ID": "0"})
    for stream, name in ((1, "output"), (2, "error")):
        if name in opts:
            fd = os.open(expand(opts[name], env), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, stream)
    if "error" not in opts and "output" in opts:
        os.dup2(1, 2)
    os.execvp(command[0], command)
    return 1  # not reached


def scancel(args: list[str]) -> int:
    found, ids = options(args)
    for key in matching(ids):
        state = read(key)
        if "signal" in found:
            if state["step_pid"]:
                name = found["signal"][0].upper().removeprefix("SIG")
                os.kill(state["step_pid"], getattr(signal, f"SIG{name}"))
            continue
        if state["state"] in LIVE:
            update(key, state="CANCELLED", requeue=False)
            if state["step_pid"]:
                os.kill(state["step_pid"], signal.SIGTERM)
    return 0


def scontrol(args: list[str]) -> int:
    if args[:1] != ["requeue"]:
        print(f"fake scontrol: unsupported {args}", file=sys.stderr)
        return 1
    for key in matching(args[1:]):
        if read(key)["state"] == "RUNNING":
            update(key, requeue=True)
    return 0


def squeue(args: list[str]) -> int:
    found, _ = options(args, flags=("--noheader", "-h", "--array", "-r"))
    ids = ",".join(found.get("jobs", []) + found.get("j", [])).split(",")
    fmt = (found.get("format") or found.get("o") or ["%i %T"])[0]
    if "noheader" not in found and "h" not in found:
        print(fmt.replace("%i", "JOBID").replace("%T", "STATE"))
    for key in matching([i for i in ids if i]):
        state = read(key)["state"]
        if state in LIVE:
            print(fmt.replace("%i", key).replace("%T", state))
    return 0


def sacct(args: list[str]) -> int:
    found, _ = options(args, flags=("--noheader", "-n", "--parsable2", "-P"))
    ids = ",".join(found.get("jobs", []) + found.get("j", [])).split(",")
    columns = ",".join(found.get("format", []) + found.get("o", [])).split(",") or ["JobID", "State"]
    if "noheader" not in found and "n" not in found:
        print("|".join(columns))
    for key in matching([i for i in ids if i]):
        state = read(key)
        values = {
            "JobID": key,
            "State": state["state"],
            "NodeList": "localhost",
            "ExitCode": f"{state['exit_code'] or 0}:0",
        }
        print("|".join(values.get(column, "") for column in columns))
    return 0


COMMANDS = {
    "sbatch": sbatch,
    "_runner": runner,
    "srun": srun,
    "scancel": scancel,
    "scontrol": scontrol,
    "squeue": squeue,
    "sacct": sacct,
}


if __name__ == "__main__":
    name, arguments = sys.argv[1], sys.argv[2:]
    if name != "_runner":
        record(name, arguments)
    sys.exit(COMMANDS[name](arguments))
