"""Shared fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture
def float64():
    """Exactness claims are checked in float64; restored afterwards so other modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


REPO_ROOT = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """Environment for running our commands in a child process: one thread, no wandb, the repo importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    return child_env()


@pytest.fixture(scope="session")
def smoke_figures(tmp_path_factory) -> Path:
    """Every figure's smoke run, once per session, in one thread (`make smoke-reference`'s runs):
    work/runs/<sweep>/<run>/, work/figures/smoke/<figure>.*, and work/measured.json (their numbers)."""
    work = tmp_path_factory.mktemp("smoke_figures")
    command = [sys.executable, "-m", "experiments.smoke_reference", "--out", str(work / "measured.json")]
    subprocess.run(
        [*command, "--work", str(work)], cwd=REPO_ROOT, env=child_env(), check=True, capture_output=True
    )
    return work


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): a second
    OpenMP thread only spin-waits there (100x slower on busy cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
