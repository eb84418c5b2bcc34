"""Fetch the paper runs' prompt files and the LAION aesthetic head, checked by sha256 (`make paper-data`).

The manifest (configs/paper_data.yaml) lists each file's name under the data root (``$RSM_BENCH_DATA``,
default ``~/.cache/rsm_bench``), its URL and its sha256. A file is downloaded to ``<name>.part`` beside
its final name, resuming a partial ``.part`` with an HTTP Range request when the server allows it, and
renamed to the final name only once its digest matches: a final file is never there unverified.

A null sha256 means trust on first use: the first complete download's digest is recorded in
``<root>/SHA256SUMS`` and later runs are checked against it. A final file that no longer matches its
pinned or recorded digest (altered on disk), or one with no digest to check, is fetched again and the
new copy must match; an upstream file that changed therefore stops with an error rather than
replacing what the runs were recorded with. Model weights are not fetched here: the manifest's
``hf download`` commands are printed at the end.

    python -m experiments.paper_data [--dest DIR] [--only NAME ...] [--manifest FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from omegaconf import OmegaConf
from tqdm import tqdm

from experiments.cli import run as run_cli
from rsm_core.config import ConfigError
from rsm_core.records import DATA_ENV, AssetError, atomic_write_text, data_root

MANIFEST = Path(__file__).parent / "configs" / "paper_data.yaml"
SUMS = "SHA256SUMS"
CHUNK = 1 << 16
DIGEST = re.compile(r"[0-9a-f]{64}")


class FetchError(AssetError):
    """A data file could not be fetched, or what was fetched does not match its digest."""


class _Incomplete(OSError):
    """The server closed the transfer early; a retry resumes from what arrived."""


@dataclass(frozen=True)
class Entry:
    name: str
    url: str
    sha256: str | None
    used_by: str


@dataclass(frozen=True)
class Manifest:
    files: list[Entry]
    models: list[dict[str, str]]


@dataclass(frozen=True)
class Fetched:
    """One row of the summary: ``status`` is ok (already there), fetched (checked against its digest)
    or recorded (unpinned; its digest was recorded in SHA256SUMS)."""

    name: str
    size: int
    sha256: str
    status: str


def load_manifest(path: Path = MANIFEST) -> Manifest:
    """The manifest, checked: names are unique relative paths, URLs http(s), digests 64 hex or null,
    and each model has a command and what uses it."""
    raw = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(raw, dict) or not isinstance(raw.get("files"), list):
        raise ConfigError(f"{path}: expected a 'files' list (name, url, sha256, used_by per entry)")
    files = []
    for item in raw["files"]:
        if not isinstance(item, dict) or set(item) != {"name", "url", "sha256", "used_by"}:
            raise ConfigError(f"{path}: entry {item!r} must have exactly name, url, sha256, used_by")
        name, url, digest = str(item["name"]), str(item["url"]), item["sha256"]
        parts = PurePosixPath(name).parts
        if not parts or name.startswith("/") or ".." in parts or name == SUMS or name.endswith(".part"):
            raise ConfigError(f"{path}: name {name!r} must be a plain path under the data root")
        if not url.startswith(("https://", "http://")):
            raise ConfigError(f"{path}: {name}: url {url!r} is not http(s)")
        if digest is not None and not DIGEST.fullmatch(str(digest)):
            raise ConfigError(f"{path}: {name}: sha256 must be 64 lowercase hex digits or null")
        files.append(Entry(name, url, digest, str(item["used_by"])))
    names = [entry.name for entry in files]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{path}: names listed twice: {duplicates}")
    models = list(raw.get("models") or [])
    for model in models:
        if not isinstance(model, dict) or set(model) != {"command", "used_by"}:
            raise ConfigError(f"{path}: model {model!r} must have exactly command, used_by")
    return Manifest(files, models)


def select(entries: list[Entry], only: list[str] | None) -> list[Entry]:
    """The entries ``--only`` names (all without it); an unknown name is an error listing the known."""
    if not only:
        return entries
    known = {entry.name for entry in entries}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ConfigError(f"--only: unknown names {unknown}; the manifest lists {sorted(known)}")
    return [entry for entry in entries if entry.name in only]


def data_file(path: str) -> Path:
    """A data file as a config names it: an absolute path, or one relative to the cwd that exists, is
    used as given; otherwise the name under the data root, where `make paper-data` puts it. A file
    under the data root is checked against its pinned or recorded sha256 (``verified``)."""
    given = Path(path).expanduser()
    under_root = data_root() / given
    for candidate in (given, under_root):
        if candidate.is_file():
            return verified(candidate)
    looked = [given] if given.is_absolute() else [Path.cwd() / given, under_root]
    raise FileNotFoundError(
        f"data file {path!r} not found (looked at {', '.join(str(p) for p in looked)}); run "
        f"`make paper-data` to fetch the paper's data files into {data_root()} (${DATA_ENV}), or point "
        f"the config (e.g. prompts.train_file) at an existing file"
    )


def verified(file: Path) -> Path:
    """``file``, after checking it against the digest `make paper-data` pinned or recorded for it if it
    lies under the data root: a file altered or damaged since it was fetched is an AssetError (the
    next `make paper-data` fetches it again). Files elsewhere, or without a digest, are the user's."""
    root = data_root().resolve()
    if not file.resolve().is_relative_to(root):
        return file
    name = file.resolve().relative_to(root).as_posix()
    pinned = {entry.name: entry.sha256 for entry in load_manifest().files if entry.sha256}
    expected, where = pinned.get(name), f"pinned in {MANIFEST}"
    if expected is None:
        expected, where = read_sums(data_root()).get(name), f"recorded in {root / SUMS}"
    if expected is None:
        return file
    actual = file_sha256(file)
    if actual != expected:
        raise AssetError(
            f"{file} is altered or damaged: its sha256 is {actual}, {where} expects {expected}; run `make "
            f"paper-data` to fetch it again"
        )
    return file


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def read_sums(root: Path) -> dict[str, str]:
    """``<root>/SHA256SUMS`` as name -> digest (sha256sum's ``<hex>  <name>`` lines)."""
    path = root / SUMS
    if not path.exists():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or not DIGEST.fullmatch(digest):
            raise FetchError(
                f"{path}: malformed line {line!r}; expected '<sha256 hex>  <name>', fix or delete it"
            )
        sums[name] = digest
    return sums


def write_sums(root: Path, sums: dict[str, str]) -> None:
    atomic_write_text(root / SUMS, "".join(f"{sums[name]}  {name}\n" for name in sorted(sums)))


def _total(response: http.client.HTTPResponse) -> int | None:
    """The full file's size from a 200's Content-Length or a 206's Content-Range, if the server says."""
    if response.status == 206:
        size = response.headers.get("Content-Range", "").rpartition("/")[2]
        return int(size) if size.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _transfer(entry: Entry, part: Path, timeout: float) -> None:
    """One attempt: append to ``part`` from where it stops (a 206 answer to the Range request), or
    rewrite it from zero (a 200). Raises ``_Incomplete`` when fewer bytes arrive than announced."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "rsm-bench-paper-data"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(entry.url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        resumed = response.status == 206 and response.headers.get("Content-Range", "").startswith(
            f"bytes {offset}-"
        )
        start = offset if resumed else 0
        total = _total(response)
        note = f" (resuming at {offset} bytes)" if resumed else ""
        print(f"{entry.name}: fetching {entry.url}{note}", flush=True)
        with (
            open(part, "ab" if resumed else "wb") as handle,
            tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=entry.name, disable=None) as bar,
        ):
            while block := response.read(CHUNK):
                handle.write(block)
                bar.update(len(block))
            handle.flush()
            os.fsync(handle.fileno())
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Incomplete(f"transfer ended at {size} of {total} bytes")


def _reason(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}"


def _download(entry: Entry, part: Path, retries: int, backoff: float, timeout: float) -> None:
    """``_transfer`` with retries on network errors and 5xx/408/429 answers (backoff doubling each
    time); a 416 (the .part does not fit the file) restarts from zero."""
    for attempt in range(retries + 1):
        try:
            _transfer(entry, part, timeout)
            return
        except urllib.error.HTTPError as error:
            error.close()  # its response's socket
            if error.code == 416:
                part.unlink(missing_ok=True)
            elif error.code < 500 and error.code not in (408, 429):
                raise FetchError(
                    f"could not fetch {entry.name} from {entry.url}: {_reason(error)}; the manifest's URL "
                    "may be out of date: fix it there"
                ) from None
            failure: Exception = error
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            failure = error
        if attempt < retries:
            wait = backoff * 2**attempt
            print(f"{entry.name}: {_reason(failure)}; retrying in {wait:g} s", flush=True)
            time.sleep(wait)
    raise FetchError(
        f"could not fetch {entry.name} from {entry.url}: {_reason(failure)}; check the network (or proxy) "
        f"and rerun `make paper-data`, which resumes from what arrived"
    )


def fetch(entry: Entry, root: Path, retries: int = 4, backoff: float = 2.0, timeout: float = 60.0) -> Fetched:
    """One entry into ``root``: kept if it matches its pinned or recorded digest, otherwise downloaded
    and verified (an unpinned first download's digest is recorded)."""
    final = root / entry.name
    sums = read_sums(root)
    expected = entry.sha256 or sums.get(entry.name)
    if final.is_file():
        found = file_sha256(final)
        if found == expected:
            return Fetched(entry.name, final.stat().st_size, found, "ok")
        why = f"does not match sha256 {expected}" if expected else "has no digest to check it against"
        print(f"{entry.name}: the file there (sha256 {found}) {why}; deleted it, fetching it again")
        final.unlink()
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    _download(entry, part, retries, backoff, timeout)
    got = file_sha256(part)
    if expected and got != expected:
        part.unlink()
        where, fix = (
            ("pinned in the manifest", "update its sha256 there")
            if entry.sha256
            else (f"recorded in {root / SUMS}", "delete its line there")
        )
        raise FetchError(
            f"{entry.name}: sha256 mismatch (expected {expected}, {where}; got {got} from {entry.url}); "
            f"deleted the download; rerun `make paper-data`, and if it persists the file changed upstream: "
            f"check the new file, then {fix}"
        )
    os.replace(part, final)
    if expected:
        return Fetched(entry.name, final.stat().st_size, got, "fetched")
    write_sums(root, {**sums, entry.name: got})
    print(f"{entry.name}: sha256 {got} is not pinned in the manifest; recorded it in {root / SUMS}")
    return Fetched(entry.name, final.stat().st_size, got, "recorded")


def summary(rows: list[Fetched]) -> str:
    width = max([len("name"), *(len(row.name) for row in rows)])
    lines = [f"{'name':<{width}}  {'bytes':>10}  {'sha256':<12}  status"]
    lines += [f"{r.name:<{width}}  {r.size:>10}  {r.sha256[:12]}  {r.status}" for r in rows]
    return "\n".join(lines)


def models_text(models: list[dict[str, str]]) -> str:
    """The ``hf download`` commands for the model weights (this command does not fetch those)."""
    lines = ["model weights (Hugging Face cache; fetch them with the Hugging Face CLI):"]
    lines += [f"  {model['command']}  # {model['used_by']}" for model in models]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dest", type=Path, default=None, help=f"data root (default: ${DATA_ENV} or ~/.cache/rsm_bench)"
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="fetch only these manifest names")
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    args = parser.parse_args(argv)
    manifest = load_manifest(args.manifest)
    root = (args.dest or data_root()).expanduser()
    rows = [fetch(entry, root) for entry in select(manifest.files, args.only)]
    print(summary(rows))
    print(models_text(manifest.models))


if __name__ == "__main__":
    run_cli(main)
