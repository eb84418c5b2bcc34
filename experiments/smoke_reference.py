"""`make smoke-reference`: the numbers gate's reference — every figure's smoke run, measured.

Runs the smoke scale of each figure (`fig3`, `fig-zo-flow`, `fig-toy`), each in a fresh process with
one thread, where our torch build is bit-for-bit repeatable (two such processes side by side: the
figures share nothing but the read-only tiny world), and records every number each run logged
(metrics.jsonl rows without the wall-clock columns). `tests/test_numbers_gate.py` runs the same and
compares with tests/reference/smoke_metrics.json: exactly when the torch version and the CPU kernels
torch picked (its capability, e.g. AVX2 or AVX512) match the ones recorded, within ``TOLERANCE``
otherwise. A change that moves the numbers reruns this target and commits the new reference with a
message that says why.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from experiments import fig3, fig_toy, fig_zo_flow
from experiments.cli import run
from rsm_core.records import atomic_write_text, read_metrics

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference" / "smoke_metrics.json"
FIGURES: dict[str, tuple[Callable[[list[str] | None], None], list[str]]] = {
    "fig3": (fig3.main, []),
    "fig_zo_flow": (fig_zo_flow.main, []),
    "fig_toy": (fig_toy.main, ["--name", "fig_toy-smoke"]),
}
TOLERANCE = {"rtol": 1e-3, "atol": 1e-6}  # another torch build: float rounding may move the numbers
# measurements of this machine, not of the method
UNTIMED = ("time_", "wallclock_", "gpu_hours", "peak_memory_gib")


def _run_figure(name: str, work: Path) -> None:
    """One figure's smoke in this process, in one thread."""
    torch.set_num_threads(1)
    main, extra = FIGURES[name]
    main(
        ["--scale", "smoke", "--runs-dir", str(work / "runs"), "--figures-dir", str(work / "figures"), *extra]
    )


def measure(work: Path, processes: int = 2) -> dict:
    """Run every figure's smoke into ``work`` (``processes`` at a time, each fresh) and return its
    numbers, run by run."""
    torch.set_num_threads(1)
    runs: dict[str, list[dict]] = {}
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no state carried between figures
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        for done in [pool.submit(_run_figure, name, work) for name in FIGURES]:
            done.result()
    for metrics in sorted((work / "runs").rglob("metrics.jsonl")):
        run_dir = metrics.parent
        rows = read_metrics(run_dir)
        runs[str(run_dir.relative_to(work / "runs"))] = [
            {k: v for k, v in row.items() if not k.startswith(UNTIMED)} for row in rows
        ]
    return {
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": 1,
        "runs": runs,
    }


def differences(reference: dict, measured: dict) -> list[str]:
    """Every number that moved (exactly on the reference's torch build, else beyond TOLERANCE)."""
    exact = all(reference.get(key) == measured.get(key) for key in ("torch", "cpu"))
    found = []
    if set(reference["runs"]) != set(measured["runs"]):
        found.append(f"runs differ: {sorted(set(reference['runs']) ^ set(measured['runs']))}")
    for name in sorted(set(reference["runs"]) & set(measured["runs"])):
        old_rows, new_rows = reference["runs"][name], measured["runs"][name]
        if len(old_rows) != len(new_rows):
            found.append(f"{name}: {len(old_rows)} rows logged before, {len(new_rows)} now")
        for i, (old, new) in enumerate(zip(old_rows, new_rows, strict=False)):
            for key in sorted(set(old) | set(new)):
                a, b = old.get(key), new.get(key)
                if not _same(a, b, exact):
                    found.append(f"{name} row {i} {key}: {a!r} -> {b!r}")
    return found


def _same(a, b, exact: bool) -> bool:
    if (
        isinstance(a, bool)
        or isinstance(b, bool)
        or not isinstance(a, int | float)
        or not isinstance(b, int | float)
    ):
        return a == b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b if exact else math.isclose(a, b, rel_tol=TOLERANCE["rtol"], abs_tol=TOLERANCE["atol"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REFERENCE, help="where to write the numbers")
    parser.add_argument(
        "--work", type=Path, help="keep the smoke runs and figures here (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        measured = measure(work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(measured, indent=1, sort_keys=True) + "\n")
    rows = sum(len(r) for r in measured["runs"].values())
    build = f"torch {measured['torch']}, {measured['cpu']}, 1 thread"
    print(f"wrote {args.out}: {len(measured['runs'])} runs, {rows} rows ({build})")


if __name__ == "__main__":
    run(main)
