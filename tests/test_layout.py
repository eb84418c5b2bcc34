"""The layout's import rules (docs/design.md) are contracts in pyproject.toml that `make lint` checks
with import-linter; here they are shown to catch a violation: the same check on a copy of the
packages passes, then fails once a core module imports a package above it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rsm_core", "baselines", "reward_models", "experiments")


def lint_imports(tree: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
        ],
        cwd=tree,
        env={**env, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("rsm_core/flows.py", "import baselines.registry  # noqa"),
        ("rsm_core/trainer.py", "from reward_models import world  # noqa"),
        ("baselines/grpo.py", "import experiments.run  # noqa"),
        ("reward_models/shapes_clip.py", "from baselines import registry  # noqa"),
    ],
)
def test_import_contracts_fail_on_an_import_against_the_layout(
    tmp_path: Path, subprocess_env: dict[str, str], module: str, line: str
) -> None:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("assets", "__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    clean = lint_imports(tmp_path, subprocess_env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}\n")
    broken = lint_imports(tmp_path, subprocess_env)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout
