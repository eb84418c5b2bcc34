"""Corrupted or hash-mismatched assets: the tiny world's and the toy's shipped weights (copied to a
temporary folder, which their loaders take as ``directory``) and the paper data under
$RSM_BENCH_DATA. A flipped byte, a truncated file or a damaged manifest is an AssetError naming the
file, the expected and the actual hash, and the command that restores it; nothing is written, so the
damaged file stays as it was for whoever looks into it."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from experiments.paper_data import file_sha256, write_sums
from experiments.run import read_prompts
from reward_models.world import load_reward_nets
from rsm_core.records import DATA_ENV, AssetError, sha256
from rsm_core.toy import assets as toy
from rsm_core.world import assets as world

REPO = Path(__file__).resolve().parents[1]


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE: dict[str, Callable[[Path], None]] = {"flipped byte": flip_a_byte, "truncated": truncate}


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def refused(load: Callable[[], object], folder: Path) -> str:
    """``load``'s AssetError message, after checking the failed load left ``folder`` as it was."""
    before = contents(folder)
    with pytest.raises(AssetError) as failure:
        load()
    assert contents(folder) == before
    return str(failure.value)


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize(
    ("name", "load"),
    [("flow", world.load_backbones), ("aesthetic", load_reward_nets)],
    ids=["flow", "aesthetic"],
)
def test_a_damaged_tiny_world_file_is_refused_naming_both_hashes_and_the_fix(
    name, load, damage, tmp_path
) -> None:
    folder = copy_of(world.ASSET_DIR, tmp_path)
    entry = json.loads((folder / world.MANIFEST).read_text())["files"][name]
    target = folder / entry["file"]
    DAMAGE[damage](target)
    message = refused(lambda: load(folder), folder)
    assert str(target) in message and entry["sha256"] in message and sha256(target) in message, message
    assert f'make tiny-assets ARGS="--out {folder}"' in message


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_toy_denoiser_is_refused_naming_both_hashes_and_the_fix(damage, tmp_path) -> None:
    folder = copy_of(toy.ASSET_DIR, tmp_path)
    entry = json.loads((folder / toy.MANIFEST).read_text())["models"]["base"]
    target = folder / entry["file"]
    DAMAGE[damage](target)
    message = refused(lambda: toy.load_denoisers(toy.TrainSettings(), folder), folder)
    assert str(target) in message and entry["sha256"] in message and sha256(target) in message, message
    assert f"python -m experiments.toy_assets --out {folder}" in message and "--retrain" in message


@pytest.mark.parametrize(
    ("folder", "load"),
    [
        (world.ASSET_DIR, world.load_backbones),
        (toy.ASSET_DIR, lambda d: toy.load_denoisers(toy.TrainSettings(), d)),
    ],
    ids=["tiny-world", "toy"],
)
def test_a_damaged_or_missing_manifest_or_file_is_an_asset_error(folder, load, tmp_path) -> None:
    copy = copy_of(folder, tmp_path)
    manifest = copy / "manifest.json"
    truncate(manifest)
    assert f"{manifest} is damaged" in refused(lambda: load(copy), copy)
    manifest.unlink()
    assert f"{manifest} not found" in refused(lambda: load(copy), copy)
    shutil.copy(folder / "manifest.json", manifest)
    for weights in copy.glob("*.safetensors"):
        weights.unlink()
    assert f"is missing (listed in {manifest})" in refused(lambda: load(copy), copy)


@pytest.mark.parametrize(
    ("module", "target"), [(world, "tiny-assets"), (toy, "toy-assets")], ids=["tiny-world", "toy"]
)
def test_the_shipped_folders_are_restored_by_the_git_command_their_errors_name(module, target) -> None:
    fix = module._fix(module.ASSET_DIR)
    relative = module.ASSET_DIR.relative_to(REPO).as_posix()
    assert f"`git checkout -- {relative}`" in fix and f"`make {target}`" in fix
    tracked = subprocess.run(
        ["git", "ls-files", relative], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert f"{relative}/manifest.json" in tracked.stdout.split()  # what git checkout restores


def test_a_fetched_paper_data_file_altered_on_disk_is_refused_by_the_run(tmp_path, monkeypatch) -> None:
    root = tmp_path / "data"
    monkeypatch.setenv(DATA_ENV, str(root))
    monkeypatch.chdir(tmp_path)
    fetched = root / "pickscore" / "train.txt"
    fetched.parent.mkdir(parents=True)
    fetched.write_text("a photo of a cat\na photo of a dog\n")
    recorded = file_sha256(fetched)
    write_sums(root, {"pickscore/train.txt": recorded})  # as `make paper-data` records an unpinned file
    assert read_prompts("pickscore/train.txt") == [
        {"prompt": "a photo of a cat"},
        {"prompt": "a photo of a dog"},
    ]
    flip_a_byte(fetched)
    message = refused(lambda: read_prompts("pickscore/train.txt"), fetched.parent)
    assert str(fetched) in message and recorded in message and file_sha256(fetched) in message, message
    assert "make paper-data" in message
    own = tmp_path / "mine.txt"  # a file the config names by its own path is the user's to change
    shutil.copy(fetched, own)
    assert len(read_prompts(str(own))) == 2
