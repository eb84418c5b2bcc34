"""`python -m experiments.plot --source wandb --group G` rebuilds a sweep's figures from wandb with the
same data as `--source runs --sweep DIR` (and as the sweep itself drew them), through a fake of the
wandb public API that serves real run directories the way the run's mirror logged them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from experiments import plot
from experiments.image_grids import END, START, save_grid
from experiments.sweep import run_name
from rsm_core.config import ConfigError
from rsm_core.records import RunRecord, read_metrics

STATES = {"complete": "finished", "running": "running", "failed": "failed", "preempted": "failed"}


class FakeRun:
    """A run of ``wandb.Api().runs``, mirroring a run directory: its wandb.json where it has one, else
    the same fields from the sweep's naming (group = sweep directory, job type = arm, tag seed:<n>).
    Its history holds the numeric values of each metrics row under wandb's own keys, None where a row
    did not log a key; ``stale`` replays the first rows with other values before them, as a resumed
    run's history holds the epochs redone after its checkpoint."""

    def __init__(self, run_dir: Path, arm: str, seed: int, stale: int = 0) -> None:
        info = (
            json.loads((run_dir / "wandb.json").read_text())
            if (run_dir / "wandb.json").exists()
            else {
                "id": f"id-{run_dir.name}",
                "name": f"{run_dir.parent.name}/{run_dir.name}",
                "group": run_dir.parent.name,
                "job_type": arm,
                "tags": [f"seed:{seed}", "scale:smoke"],
            }
        )
        self.id, self.name, self.group = info["id"], info["name"], info["group"]
        self.job_type, self.tags = info["job_type"], list(info["tags"])
        self.config = {"dir": str(run_dir)}
        self.state = STATES[json.loads((run_dir / "status.json").read_text())["state"]]
        self.run_dir, self.stale = run_dir, stale

    def scan_history(self):
        rows = read_metrics(self.run_dir, allow_incomplete=True)
        numeric = [{k: v for k, v in row.items() if isinstance(v, int | float)} for row in rows]
        keys = sorted({k for row in numeric for k in row})
        stale = [{**row, "eval_reward": -1.0, "nfe": -1} for row in numeric[: self.stale]]
        for step, row in enumerate(stale + numeric):
            yield {"_step": step, "_runtime": 1.5 * step, **{k: row.get(k) for k in keys}}


class FakeApi:
    """``wandb.Api()``'s runs(path, filters={"group": G}); records each query."""

    def __init__(self, runs: list[FakeRun]) -> None:
        self._runs, self.queries = runs, []

    def runs(self, path: str, filters: dict[str, Any]) -> list[FakeRun]:
        self.queries.append((path, filters))
        return [run for run in self._runs if run.group == filters["group"]]


def serve(sweep: Path, arms: list[str], stale: int = 0) -> list[FakeRun]:
    """A fake wandb run for each run directory of ``arms`` in ``sweep`` (any seed, any state)."""
    runs = []
    for arm in arms:
        for seed in range(10):
            if (sweep / run_name(arm, seed)).is_dir():
                runs.append(FakeRun(sweep / run_name(arm, seed), arm, seed, stale=stale))
    return runs


@pytest.mark.parametrize("figure", ["fig3", "fig_zo_flow"])
def test_wandb_rebuilds_the_smoke_figure_with_the_sweeps_data(
    smoke_figures: Path, tmp_path: Path, figure: str
) -> None:
    sweep = smoke_figures / "runs" / f"{figure}-smoke"
    api = FakeApi(serve(sweep, list(plot.sweep_figures()[figure].arms), stale=2))
    plot.main(["--source", "runs", "--sweep", str(sweep), "--figures-dir", str(tmp_path / "runs")])
    group = ["--group", sweep.name, "--project", "p", "--figures-dir", str(tmp_path / "wandb")]
    plot.main(["--source", "wandb", *group], api=api)
    drawn = (smoke_figures / "figures" / "smoke" / f"{figure}.csv").read_text()
    assert (tmp_path / "runs" / "smoke" / f"{figure}.csv").read_text() == drawn
    assert (tmp_path / "wandb" / "smoke" / f"{figure}.csv").read_text() == drawn
    assert (tmp_path / "wandb" / "smoke" / f"{figure}.png").stat().st_size > 0
    assert api.queries == [("p", {"group": f"{figure}-smoke"})]


# Figures 5 and 6 share one sweep; each diffusion arm logs eval_kl, each flow arm eval_drift
FLOW = (
    "Redesign (flow)",
    "VGG-Flow (pruned)",
    "VGG-Flow (unpruned)",
    "Linear Baseline A",
    "Linear Baseline B",
)
DIFFUSION = ("Redesign (diffusion)", "Residual nabla-DB (pruned)", "Lookahead estimator, redesign weighting")


def first_order_sweep(root: Path) -> Path:
    """first-order-smoke: two seeds of every arm of Figures 5 and 6, made through RunRecord, each with
    its evaluation grids; VGG-Flow (unpruned) seed 1 is still running."""
    sweep = root / "first-order-smoke"
    generator = torch.Generator().manual_seed(0)
    for a, arm in enumerate(FLOW + DIFFUSION):
        for seed in (0, 1):
            record = RunRecord.create(sweep, run_name(arm, seed), {"method": arm}, wandb=False)
            for epoch in range(3):
                value = 10 * a + seed + 0.1 * epoch
                row = {"epoch": epoch, "nfe": 50 * epoch, "wallclock_h": 0.01 * epoch + 0.001 * a}
                row |= {"eval_reward": value, "eval_drift" if arm in FLOW else "eval_kl": value / 100}
                row |= {"reward_mean": value if epoch else math.nan, "method_note": "strings stay local"}
                record.log(row)
            for name in (START, END):
                save_grid(torch.rand(2, 3, 8, 8, generator=generator), record.path / name)
            if (arm, seed) != ("VGG-Flow (unpruned)", 1):
                record.finish()
    return sweep


def test_a_shared_group_draws_both_its_figures_the_same_from_either_source(tmp_path: Path, capsys) -> None:
    sweep = first_order_sweep(tmp_path)
    api = FakeApi(serve(sweep, [*FLOW, *DIFFUSION], stale=1))
    plot.main(["--source", "runs", "--sweep", str(sweep), "--figures-dir", str(tmp_path / "runs")])
    from_runs = capsys.readouterr().out
    plot.main(["--source", "wandb", "--group", sweep.name, "--figures-dir", str(tmp_path / "wandb")], api=api)
    from_wandb = capsys.readouterr().out
    for out in (from_runs, from_wandb):  # the unfinished run is named, not drawn
        assert "left out" in out and "vgg-flow-(unpruned)-seed1" in out
    figures = plot.sweep_figures()
    for name in ("fig5", "fig6"):
        csv = (tmp_path / "runs" / "smoke" / f"{name}.csv").read_text()
        assert (tmp_path / "wandb" / "smoke" / f"{name}.csv").read_text() == csv
        data = figures[name].frame(plot.directory_runs(sweep, figures[name].arms)[0])
        assert list(data["arm"].unique()) == list(figures[name].arms)  # the figure's arms, in its order
        assert data.to_csv(index=False) == csv
    fig5 = figures["fig5"].frame(plot.directory_runs(sweep, FLOW)[0])
    assert fig5.groupby("arm")["seed"].nunique().to_dict()["VGG-Flow (unpruned)"] == 1
    assert (fig5["kl_or_drift"] * 100 - fig5["reward"]).abs().max() < 1e-9  # drift or KL, as logged
    # the start | end images come from the run directories only
    assert (tmp_path / "runs" / "smoke" / "fig5_images.png").stat().st_size > 0
    assert not (tmp_path / "wandb" / "smoke" / "fig5_images.png").exists()


def test_wandb_source_errors_name_the_fix(tmp_path: Path, monkeypatch) -> None:
    sweep = first_order_sweep(tmp_path)
    runs = serve(sweep, ["Redesign (flow)", "Redesign (diffusion)"])
    out = ["--figures-dir", str(tmp_path / "fig")]
    monkeypatch.setenv("WANDB_ENTITY", "lab")
    monkeypatch.setenv("WANDB_PROJECT", "bench")
    with pytest.raises(
        plot.NoRunsError, match=r"no runs in group 'fig3-smoke' of project 'lab/bench'.*wandb sync"
    ):
        plot.main(["--source", "wandb", "--group", "fig3-smoke", *out], api=FakeApi(runs))
    api = FakeApi(runs)
    plot.main(
        ["--source", "wandb", "--group", sweep.name, "--figure", "fig5", "--entity", "me", *out], api=api
    )
    assert api.queries[0][0] == "me/bench" and (tmp_path / "fig" / "smoke" / "fig5.csv").exists()
    assert not (tmp_path / "fig" / "smoke" / "fig6.csv").exists()  # --figure: only the one named
    with pytest.raises(ConfigError, match="cannot tell the figure of 'my-sweep'.*--figure"):
        plot.main(["--source", "wandb", "--group", "my-sweep", *out], api=FakeApi(runs))
    twice = FakeRun(sweep / run_name("Redesign (flow)", 0), "Redesign (flow)", 0)
    twice.id = "another-id"
    with pytest.raises(
        ConfigError, match="two finished wandb runs of Redesign \\(flow\\) seed 0.*another-id"
    ):
        plot.main(["--source", "wandb", "--group", sweep.name, *out], api=FakeApi([*runs, twice]))
    untagged = FakeRun(sweep / run_name("Redesign (flow)", 1), "Redesign (flow)", 1)
    untagged.tags = ["scale:smoke"]
    runs, left_out = plot.wandb_runs(FakeApi([untagged]), "p", sweep.name, ["Redesign (flow)"])
    assert runs == {} and "no single seed:<n> tag" in left_out[0]
    with pytest.raises(FileNotFoundError, match="no sweep directory"):
        plot.main(["--source", "runs", "--sweep", str(tmp_path / "fig3-smoke"), *out])


def test_the_toy_figure_still_redraws_from_its_run(smoke_figures: Path, tmp_path: Path) -> None:
    plot.main(["fig-toy", str(smoke_figures / "runs" / "fig_toy-smoke"), "--out", str(tmp_path / "toy")])
    drawn = (smoke_figures / "figures" / "smoke" / "fig_toy.csv").read_text()
    assert (tmp_path / "toy.csv").read_text() == drawn


@pytest.mark.parametrize("compute", ["gpu_hours", "nfe", "epoch"])
def test_a_figure_can_plot_reward_against_any_compute_axis(tmp_path: Path, compute: str) -> None:
    """The budget kinds of a matched sweep as the first panel's x: the rows keep every axis' column and
    the drawn line follows the chosen one (here gpu_hours = 2 x wall-clock, 2 processes)."""
    sweep = first_order_sweep(tmp_path)
    for run_dir in sweep.iterdir():  # give the rows the GPU-hours a 2-process run logs
        rows = read_metrics(run_dir, allow_incomplete=True)
        text = "".join(json.dumps(row | {"gpu_hours": 2 * row["wallclock_h"]}) + "\n" for row in rows)
        (run_dir / "metrics.jsonl").write_text(text)
    plot.main(
        ["--source", "runs", "--sweep", str(sweep), "--figures-dir", str(tmp_path / "out"), "--x", compute]
    )
    fig5 = plot.sweep_figures()["fig5"]
    data = fig5.frame(plot.directory_runs(sweep, fig5.arms)[0])
    assert (data["gpu_hours"] == 2 * data["wallclock_h"]).all()
    written = tmp_path / "out" / "smoke" / f"fig5_{compute}.csv"
    assert written.read_text() == data.to_csv(index=False)
    assert (tmp_path / "out" / "smoke" / f"fig6_{compute}.png").stat().st_size > 0
