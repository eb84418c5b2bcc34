"""The multi-process launcher: the repository's accelerate config, a free port, and no silent fall
back to one process when GPUs are missing."""

from __future__ import annotations

import socket

import pytest
from omegaconf import OmegaConf

from experiments import launch


def test_too_few_gpus_is_refused_naming_the_count_and_the_fixes() -> None:
    with pytest.raises(
        launch.LaunchError, match=r"2 processes need 2 GPUs and this machine has 1.*SCALE=1gpu"
    ):
        launch.environment(2, ["--scale", "paper"], gpus=1)
    assert "ACCELERATE_USE_CPU" not in launch.environment(2, [], gpus=2)


def test_allow_cpu_runs_the_processes_on_the_cpu() -> None:
    assert launch.environment(2, ["--scale", "paper", "--allow-cpu"], gpus=0)["ACCELERATE_USE_CPU"] == "true"


def test_the_command_names_the_repository_config_and_the_port() -> None:
    cmd = launch.command(4, "experiments.fig_zo_flow", ["--scale", "paper"], port=40123)
    assert cmd[cmd.index("--config_file") + 1] == str(launch.CONFIG)
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("--main_process_port") + 1] == "40123"
    assert cmd[-4:] == ["-m", "experiments.fig_zo_flow", "--scale", "paper"]
    config = OmegaConf.load(launch.CONFIG)
    assert config["distributed_type"] == "MULTI_GPU" and config["num_machines"] == 1


def test_the_free_port_is_free_and_two_calls_can_differ() -> None:
    port = launch.free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", port))  # nothing holds it
        server.listen()
        assert launch.free_port() != port  # taken now: another job on the node gets another port
