"""Start a module on several processes with accelerate, safely on a shared node.

    python -m experiments.launch --processes 2 experiments.fig3 --scale paper [figure args]

Three traps of a bare `accelerate launch` are closed here: it reads whatever default config the
machine has (we pass experiments/configs/accelerate/multi_gpu.yaml), it takes port 29500, which two
jobs on one node share (we take a free one), and with fewer GPUs than processes it silently runs one
process (we stop and say so). `--allow-cpu` among the module's arguments runs the processes on the
CPU over gloo instead, as the tests do; the module sees the flag too.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

CONFIG = Path(__file__).parent / "configs" / "accelerate" / "multi_gpu.yaml"
ALLOW_CPU = "--allow-cpu"


class LaunchError(SystemExit):
    pass


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def command(processes: int, module: str, arguments: list[str], port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIG),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(port),
        "-m",
        module,
        *arguments,
    ]


def environment(processes: int, arguments: list[str], gpus: int) -> dict[str, str]:
    """The processes' environment; refuses to start on fewer GPUs than processes unless told to run
    on the CPU."""
    env = dict(os.environ)
    if ALLOW_CPU in arguments:
        env["ACCELERATE_USE_CPU"] = "true"
        return env
    if gpus < processes:
        raise LaunchError(
            f"error: {processes} processes need {processes} GPUs and this machine has {gpus} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use SCALE=1gpu "
            f"for one GPU, or add {ALLOW_CPU} to run the processes on the CPU (slow; for tests)"
        )
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, required=True, help="one per GPU")
    parser.add_argument("module", help="the module to run, e.g. experiments.fig3")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="passed to the module")
    args = parser.parse_args(argv)
    if args.processes < 1:
        raise LaunchError(f"error: --processes must be at least 1, got {args.processes}")
    env = environment(args.processes, args.arguments, torch.cuda.device_count())
    return subprocess.run(
        command(args.processes, args.module, args.arguments, free_port()), env=env
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
