"""Run records and structured configs: bad input fails clearly and nothing is ever lost."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import pytest
import torch

from rsm_core.config import ConfigError, config_to_dict, load_config
from rsm_core.records import (
    IncompleteRunError,
    RunExistsError,
    RunRecord,
    atomic_write_text,
    content_fingerprint,
    load_tensors,
    read_metrics,
    save_tensors_atomic,
)


class Flavour(str, Enum):
    plain = "plain"
    fancy = "fancy"


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Schema:
    flavour: Flavour = Flavour.plain
    points: int = 4
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides_are_merged_in_order(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("points: 7\ninner:\n  steps: 3\n")
    cfg = load_config(Schema, tmp_path / "a.yaml", overrides=["inner.steps=5", "flavour=fancy"])
    assert (cfg.points, cfg.inner.steps, cfg.flavour) == (7, 5, Flavour.fancy)
    assert config_to_dict(cfg)["flavour"] == "fancy"


@pytest.mark.parametrize("source", ["file", "override"])
def test_unknown_key_names_the_key_its_source_and_the_valid_ones(tmp_path: Path, source: str) -> None:
    paths, overrides = [], []
    if source == "file":
        (tmp_path / "bad.yaml").write_text("inner:\n  lrr: 0.1\n")
        paths.append(tmp_path / "bad.yaml")
    else:
        overrides.append("inner.lrr=0.1")
    with pytest.raises(ConfigError) as error:
        load_config(Schema, *paths, overrides=overrides)
    message = str(error.value)
    assert "inner.lrr" in message and "Did you mean lr" in message and "steps" in message
    assert ("bad.yaml" if source == "file" else "inner.lrr=0.1") in message


def test_wrong_type_and_bad_enum_name_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match="'points'.*Integer"):
        load_config(Schema, overrides=["points=many"])
    with pytest.raises(ConfigError, match="'flavour'.*plain, fancy"):
        load_config(Schema, overrides=["flavour=spicy"])


def test_missing_yaml_lists_the_files_that_exist(tmp_path: Path) -> None:
    for name in ("smoke", "tiny"):
        (tmp_path / f"{name}.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match="smok.yaml does not exist.*smoke, tiny"):
        load_config(Schema, tmp_path / "smok.yaml")


def test_config_is_read_only_after_loading() -> None:
    cfg = load_config(Schema)
    with pytest.raises(Exception, match="read-only"):
        cfg.points = 3


def test_run_directory_holds_config_env_status_and_metrics(tmp_path: Path) -> None:
    with RunRecord.create(tmp_path, "r1", load_config(Schema), wandb=False) as run:
        run.log({"epoch": 0, "reward": torch.tensor(0.5)})
        run.log({"epoch": 1, "reward": 0.75})
        run.finish({"epochs": 2})
    assert "points: 4" in (run.path / "config.yaml").read_text()
    env = json.loads((run.path / "env.json").read_text())
    assert {"git_sha", "packages", "torch_threads", "device"} <= set(env)
    assert env["packages"]["torch"].startswith("2.")
    assert read_metrics(run.path) == [{"epoch": 0, "reward": 0.5}, {"epoch": 1, "reward": 0.75}]
    assert json.loads((run.path / "status.json").read_text())["state"] == "complete"


def test_an_existing_run_directory_is_refused_and_left_untouched(tmp_path: Path) -> None:
    run = RunRecord.create(tmp_path, "r1", {"a": 1}, wandb=False)
    run.log({"epoch": 0})
    before = {p.name: p.read_bytes() for p in run.path.iterdir()}
    with pytest.raises(RunExistsError, match="r1.*never overwritten.*--name"):
        RunRecord.create(tmp_path, "r1", {"a": 2}, wandb=False)
    assert {p.name: p.read_bytes() for p in run.path.iterdir()} == before


def test_an_unfinished_run_resumes_only_with_its_own_config_and_inputs(tmp_path: Path) -> None:
    weights = {"tiny_world": {"flow": "sha-a"}}
    run = RunRecord.create(tmp_path, "r", {"a": 1}, wandb=False, inputs=weights)
    run.log({"epoch": 0})
    assert json.loads((run.path / "inputs.json").read_text()) == weights
    for config, inputs in (
        ({"a": 2}, weights),
        ({"a": 1}, {"tiny_world": {"flow": "sha-b"}}),
        ({"a": 1}, None),
    ):
        with pytest.raises(RunExistsError, match="different config or inputs"):
            RunRecord.create_or_resume(tmp_path, "r", config, wandb=False, inputs=inputs)
    resumed = RunRecord.create_or_resume(tmp_path, "r", {"a": 1}, wandb=False, inputs=weights)
    assert read_metrics(resumed.path, allow_incomplete=True) == [{"epoch": 0}]


def test_incomplete_and_failed_runs_are_refused_by_readers(tmp_path: Path) -> None:
    running = RunRecord.create(tmp_path, "running", {}, wandb=False)
    running.log({"epoch": 0})
    with pytest.raises(IncompleteRunError, match="running"):
        read_metrics(running.path)
    assert read_metrics(running.path, allow_incomplete=True) == [{"epoch": 0}]
    with pytest.raises(ZeroDivisionError), RunRecord.create(tmp_path, "crash", {}, wandb=False) as run:
        1 / 0  # noqa: B018
    status = json.loads((run.path / "status.json").read_text())
    assert status["state"] == "failed" and "ZeroDivisionError" in status["error"]
    with pytest.raises(IncompleteRunError, match="failed"):
        read_metrics(run.path)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        read_metrics(tmp_path / "nothing")


def test_atomic_write_keeps_the_old_file_when_the_rename_fails(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "status.json"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temp file left behind


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    """Temp files start at 0600; results a cluster group reads must come out 0666 less the umask."""
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "table.csv", "a,b\n")
        save_tensors_atomic(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"table.csv": 0o644, "w.safetensors": 0o644, "plain.txt": 0o644}


def test_checkpoints_round_trip_as_safetensors(tmp_path: Path) -> None:
    run = RunRecord.create(tmp_path, "r", {}, wandb=False)
    tensors = {"w": torch.randn(3, 2), "b": torch.arange(4)}
    path = run.save_tensors("ckpt.safetensors", tensors)
    assert path.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then JSON — not a pickle
    loaded = load_tensors(path)
    for key, value in tensors.items():
        torch.testing.assert_close(loaded[key], value)


def test_no_environment_variable_reaches_the_run_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RSM_TEST_SECRET", "hunter2-do-not-log")
    with RunRecord.create(tmp_path, "r", {"a": 1}, wandb=False) as run:
        run.log({"epoch": 0})
        run.finish()
    for path in run.path.rglob("*"):
        if path.is_file():
            assert b"hunter2-do-not-log" not in path.read_bytes(), path


def test_wandb_mirror_runs_offline_inside_the_run_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with RunRecord.create(tmp_path, "r", {"a": 1}, wandb=True) as run:
        run.log({"epoch": 0, "reward": 1.5, "note": "text is kept out of wandb"})
        run.finish()
    offline = list((run.path / "wandb").rglob("offline-run-*"))
    assert offline, "no offline wandb run under the run directory"
    run_id = json.loads((run.path / "wandb.json").read_text())["id"]
    assert all(path.name.endswith(run_id) for path in offline), "the run id kept in wandb.json is not wandb's"
    assert read_metrics(run.path)[0]["note"] == "text is kept out of wandb"


def test_content_fingerprints_see_content_names_and_the_ends_of_large_files(tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    (folder / "transformer").mkdir(parents=True)
    big = folder / "transformer" / "model.safetensors"
    big.write_bytes(bytes(range(256)) * (3 * 4096 + 7))  # 3 MiB and a bit: sampled, not read whole
    (folder / "transformer" / "config.json").write_text('{"num_layers": 24}')
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.metadata").write_text("fetched at 12:00")
    before = content_fingerprint(folder)
    assert content_fingerprint(folder) == before

    (folder / ".cache" / "download.metadata").write_text("fetched at 13:00")
    assert content_fingerprint(folder) == before, "hidden download metadata must not count"
    (folder / "transformer" / "config.json").write_text('{"num_layers": 12}')
    assert content_fingerprint(folder) != before
    (folder / "transformer" / "config.json").write_text('{"num_layers": 24}')
    data = bytearray(big.read_bytes())
    data[-1] ^= 1  # the last tensor differs
    big.write_bytes(bytes(data))
    assert content_fingerprint(folder) != before
    data[-1] ^= 1
    big.write_bytes(bytes(data))
    assert content_fingerprint(folder) == before
    (folder / "transformer" / "config.json").rename(folder / "transformer" / "other.json")
    assert content_fingerprint(folder) != before, "file names count"
    head, moved = tmp_path / "head.pth", tmp_path / "elsewhere.pth"
    head.write_bytes(b"abc")
    moved.write_bytes(b"abc")
    assert content_fingerprint(head) == content_fingerprint(moved)  # a file is its content
    moved.write_bytes(b"abd")
    assert content_fingerprint(head) != content_fingerprint(moved)
