"""The numbers gate: every figure's smoke run logs exactly the numbers of tests/reference/ (within a
stated tolerance on another torch build). A change that moves them reruns `make smoke-reference` and
says why in the commit message; a refactor must not move a number silently."""

from __future__ import annotations

import copy
import json

from experiments.smoke_reference import REFERENCE, TOLERANCE, differences


def test_every_figure_smoke_logs_the_reference_numbers(smoke_figures) -> None:
    reference = json.loads(REFERENCE.read_text())
    measured = json.loads((smoke_figures / "measured.json").read_text())
    assert {name.split("/")[0] for name in measured["runs"]} == {
        "fig3-smoke",
        "fig_zo_flow-smoke",
        "fig_toy-smoke",
    }
    moved = differences(reference, measured)
    assert not moved, (
        f"{len(moved)} numbers moved (torch {measured['torch']} vs the reference's {reference['torch']}); "
        "if the change is meant to move them, run `make smoke-reference` and say why in the commit:\n"
        + "\n".join(moved[:40])
    )


def test_the_gate_sees_a_moved_number_and_a_missing_run() -> None:
    reference = json.loads(REFERENCE.read_text())
    name = next(n for n in reference["runs"] if n.startswith("fig3-smoke/"))
    moved = copy.deepcopy(reference)
    row = moved["runs"][name][-1]
    row["eval_reward"] = row["eval_reward"] * (1 + 1e-12)
    assert differences(reference, moved) == [
        f"{name} row {len(moved['runs'][name]) - 1} eval_reward: "
        f"{reference['runs'][name][-1]['eval_reward']!r} -> {row['eval_reward']!r}"
    ]
    other_build = {**moved, "cpu": "another CPU"}
    assert differences(reference, other_build) == []  # within the stated tolerance elsewhere
    row["eval_reward"] = reference["runs"][name][-1]["eval_reward"] * (1 + 10 * TOLERANCE["rtol"])
    assert len(differences(reference, other_build)) == 1
    del moved["runs"][name]
    assert any("runs differ" in line for line in differences(reference, moved))
