"""Shipped files checked against the manifest that records their sha256, before anything loads them.

A missing, truncated or altered file, or a damaged manifest, is an ``AssetError`` naming the file, the
expected and the actual hash, and the command that restores it (``fix``); nothing here writes, so a
damaged file stays as it was for whoever looks into it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rsm_core.records import AssetError, sha256

REPO = Path(__file__).resolve().parents[1]


def git_restore(directory: Path) -> str:
    """The command that restores a folder of files shipped in this repository."""
    return f"git checkout -- {Path(directory).resolve().relative_to(REPO).as_posix()}"


def read_manifest(path: Path, fix: str) -> dict[str, Any]:
    """A manifest's content; missing or unreadable is an AssetError."""
    if not path.is_file():
        raise AssetError(f"{path} not found, so the files it lists are missing; {fix}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AssetError(f"{path} is damaged ({error}); {fix}") from None
    if not isinstance(manifest, dict):
        raise AssetError(f"{path} is damaged (a {type(manifest).__name__}, not an object); {fix}")
    return manifest


def checked_file(directory: Path, entry: Any, name: str, manifest: Path, fix: str) -> Path:
    """The file a manifest ``entry`` ({"file", "sha256"}) names in ``directory``, after checking that
    it exists and that its sha256 is the recorded one."""
    if not isinstance(entry, dict) or not {"file", "sha256"} <= set(entry):
        raise AssetError(f"{manifest} has no file and sha256 for {name!r}; {fix}")
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise AssetError(f"{path} is missing (listed in {manifest}); {fix}")
    actual = sha256(path)
    if actual != entry["sha256"]:
        raise AssetError(
            f"{path} is altered or damaged: its sha256 is {actual}, {manifest} expects {entry['sha256']} "
            f"({path.stat().st_size} bytes on disk); {fix}"
        )
    return path
