"""The sweep summary table (results/tables/all_baselines.md): final evaluations of complete runs only,
mean and seed spread, KL or drift by method, GPU-hours (or the marked wall-clock stand-in), the
paper's direction, and every unfinished run listed instead of averaged."""

from __future__ import annotations

from pathlib import Path

import pytest

from baselines.method import Family
from experiments import summary
from rsm_core.records import RunRecord


def make_run(
    sweep: Path, name: str, method: str, rows: list[dict], state: str = "complete", epochs: int = 2
) -> None:
    record = RunRecord.create(sweep, name, {"method": method, "loop": {"epochs": epochs}}, wandb=False)
    for row in rows:
        record.log(row)
    if state == "complete":
        record.finish({"epochs": epochs})
    elif state == "failed":
        record.fail(RuntimeError("reward server down | retried 3 times"))


def eval_row(epoch: int, reward: float, divergence: str = "eval_kl", **more) -> dict:
    return {
        "epoch": epoch,
        "nfe": 100 * epoch,
        "wallclock_h": 0.5 * epoch,
        "eval_reward": reward,
        divergence: 0.01 * epoch,
        **more,
    }


def table_rows(text: str) -> dict[str, list[str]]:
    """The summary table's method rows (the first table, below its header) by method name."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |")) + 2
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start:end]]
    return {row[0]: row[1:] for row in cells}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "all_baselines-smoke"
    # two seeds of a zeroth-order method: the final evaluation counts, the earlier one does not
    make_run(
        sweep,
        "tempflow-grpo-seed0",
        "tempflow-grpo",
        [eval_row(0, 9.0), {"epoch": 1, "nfe": 100}, eval_row(2, 1.0)],
    )
    make_run(sweep, "tempflow-grpo-seed1", "tempflow-grpo", [eval_row(0, 9.0), eval_row(2, 3.0)])
    # a first-order flow arm logs drift and GPU-hours
    make_run(sweep, "vgg-flow-seed0", "vgg-flow", [eval_row(2, 5.0, "eval_drift", gpu_hours=4.0)])
    # unfinished runs: listed, never averaged (their rewards would move the means)
    make_run(sweep, "tempflow-grpo-seed2", "tempflow-grpo", [eval_row(0, 100.0)], state="failed")
    make_run(
        sweep,
        "vgg-flow-seed1",
        "vgg-flow",
        [eval_row(1, 100.0, "eval_drift", gpu_hours=9.0)],
        state="running",
    )
    (sweep / "locks").mkdir()  # the sweep's own folders are not runs
    return sweep


def test_summary_averages_complete_runs_at_their_final_evaluation(sweep: Path, tmp_path: Path) -> None:
    out = summary.write_summary(sweep, tmp_path / "tables" / "all_baselines.md")
    text = out.read_text()
    rows = table_rows(text)
    n, reward, divergence, nfe, hours, direction = rows["tempflow-grpo"]
    assert (n, reward, divergence, nfe) == ("2", "2 (1-3)", "KL 0.02 (0.02-0.02)", "200 (200-200)")
    assert hours == "1 (1-1) *" and "wall-clock hours" in text  # no gpu_hours logged: marked stand-in
    assert direction == summary.DIRECTIONS["tempflow-grpo"]
    assert rows["vgg-flow"][:5] == ["1", "5", "drift 0.02", "200", "4"]
    assert "Budget: 2 epochs for every run." in text
    # the failed run's error (its | escaped) and the running run's last epoch, not averaged
    assert (
        "| tempflow-grpo-seed2 | tempflow-grpo | failed | 0 | RuntimeError: reward server down \\| retried"
        in text
    )
    assert "| vgg-flow-seed1 | vgg-flow | running | 1 |" in text
    assert sorted(p.name for p in out.parent.iterdir()) == ["all_baselines.md"]  # atomic: no temp file


def test_paper_direction_from_the_caller_the_paper_or_the_registry(sweep: Path, tmp_path: Path) -> None:
    make_run(sweep, "sqdf-seed0", "sqdf", [eval_row(2, 1.0)])
    text = summary.summary_markdown(sweep, directions={"vgg-flow": "from the sweep config"})
    rows = table_rows(text)
    assert rows["vgg-flow"][-1] == "from the sweep config"
    assert rows["sqdf"][-1] == summary.FAMILY_DIRECTIONS[Family.BASELINE]  # in no figure
    assert list(rows)[:3] == ["vgg-flow", "sqdf", "tempflow-grpo"]  # the registry's order
    make_run(sweep, "sqdf-seed1", "sqdf", [eval_row(3, 1.0)], epochs=3)
    assert "Budgets differ: 2 epochs; 3 epochs." in summary.summary_markdown(sweep)


def test_summary_command_and_its_errors(sweep: Path, tmp_path: Path, capsys) -> None:
    summary.main([str(sweep), "--out", str(tmp_path / "s.md")])
    assert "wrote" in capsys.readouterr().out and "tempflow-grpo" in (tmp_path / "s.md").read_text()
    with pytest.raises(FileNotFoundError, match="no sweep directory"):
        summary.write_summary(tmp_path / "missing", tmp_path / "s.md")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no run directories"):
        summary.write_summary(tmp_path / "empty", tmp_path / "s.md")
