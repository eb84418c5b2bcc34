"""`make paper-data` (experiments/paper_data.py) against a local HTTP server that can fail, cut a transfer
short or ignore Range requests; the prompt-path resolution the runs share; and the real manifest
against the paper configs, so the two cannot drift apart."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.cli import run as run_cli
from experiments.paper_data import (
    MANIFEST,
    SUMS,
    Entry,
    FetchError,
    data_file,
    fetch,
    load_manifest,
    main,
    read_sums,
)
from experiments.run import read_prompts
from reward_models.laion_aesthetic import HEAD_ENV, HEAD_FILE, default_head_path
from rsm_core.config import ConfigError
from rsm_core.records import DATA_ENV

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
TRAIN = b"".join(f"a photo of prompt number {i}\n".encode() for i in range(200))
METADATA = b'{"prompt": "a red cube", "tag": "single_object"}\n'


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Files:
    """What the server serves and the knobs that make it misbehave."""

    content: dict[str, bytes]
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (name, Range header)
    fail: dict[str, int] = field(default_factory=dict)  # name -> how many 500s before serving it
    truncate: dict[str, int] = field(default_factory=dict)  # name -> bytes sent before closing (once)
    ignore_range: bool = False
    url: str = ""


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        files: Files = self.server.files  # type: ignore[attr-defined]
        name = self.path.lstrip("/")
        asked = self.headers.get("Range")
        files.requests.append((name, asked))
        if files.fail.get(name, 0) > 0:
            files.fail[name] -= 1
            self.send_error(500, "transient")
            return
        if name not in files.content:
            self.send_error(404)
            return
        data = files.content[name]
        start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and not files.ignore_range else 0
        if start >= len(data) > 0:
            self.send_error(416)
            return
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = files.truncate.pop(name, None)
        self.wfile.write(body if cut is None else body[:cut])

    def log_message(self, *args) -> None:
        """Quiet: the tests assert on ``Files.requests`` instead."""


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")  # a proxy from the environment must not see loopback requests
    monkeypatch.setenv("NO_PROXY", "*")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    files = Files({"train.txt": TRAIN, "meta.jsonl": METADATA})
    files.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.files = files  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield files
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def entry(files: Files, served: str, name: str, sha256: str | None) -> Entry:
    return Entry(name, f"{files.url}/{served}", sha256, "a test")


def write_manifest(path: Path, files: Files) -> Path:
    train = {
        "name": "p/train.txt",
        "url": f"{files.url}/train.txt",
        "sha256": digest(TRAIN),
        "used_by": "Fig 3",
    }
    meta = {"name": "g/meta.jsonl", "url": f"{files.url}/meta.jsonl", "sha256": None, "used_by": "GenEval"}
    manifest = {
        "files": [train, meta],
        "models": [{"command": "hf download some/model", "used_by": "the runs"}],
    }
    path.write_text(json.dumps(manifest))  # JSON is YAML
    return path


def test_fresh_download_is_verified_recorded_and_summarised(server, tmp_path, capsys) -> None:
    manifest = write_manifest(tmp_path / "manifest.yaml", server)
    root = tmp_path / "data"
    main(["--manifest", str(manifest), "--dest", str(root)])
    assert (root / "p/train.txt").read_bytes() == TRAIN
    assert (root / "g/meta.jsonl").read_bytes() == METADATA
    assert not list(root.rglob("*.part"))
    # only the unpinned file's digest is recorded, in sha256sum's format
    assert (root / SUMS).read_text() == f"{digest(METADATA)}  g/meta.jsonl\n"
    out = capsys.readouterr().out
    assert "g/meta.jsonl: sha256" in out and "is not pinned" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("p/", "g/"))}
    assert rows["p/train.txt"][1:] == [str(len(TRAIN)), digest(TRAIN)[:12], "fetched"]
    assert rows["g/meta.jsonl"][1:] == [str(len(METADATA)), digest(METADATA)[:12], "recorded"]
    assert "  hf download some/model  # the runs" in out


def test_verified_files_are_skipped_without_a_request(server, tmp_path, capsys) -> None:
    manifest = write_manifest(tmp_path / "manifest.yaml", server)
    root = tmp_path / "data"
    main(["--manifest", str(manifest), "--dest", str(root)])
    server.requests.clear()
    main(["--manifest", str(manifest), "--dest", str(root)])
    assert server.requests == []
    statuses = [
        line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.startswith(("p/", "g/"))
    ]
    assert statuses[-2:] == ["ok", "ok"]


def test_pinned_mismatch_is_one_line_and_leaves_nothing(server, tmp_path) -> None:
    wrong = digest(b"another file")
    with pytest.raises(FetchError) as info:
        fetch(entry(server, "train.txt", "p/train.txt", wrong), tmp_path, backoff=0)
    message = str(info.value)
    assert "\n" not in message
    assert "p/train.txt" in message and wrong in message and digest(TRAIN) in message
    assert "make paper-data" in message and "update its sha256" in message
    assert not (tmp_path / "p/train.txt").exists() and not (tmp_path / "p/train.txt.part").exists()


def test_a_cut_transfer_is_resumed_with_a_range_request(server, tmp_path) -> None:
    item = entry(server, "train.txt", "p/train.txt", digest(TRAIN))
    server.truncate["train.txt"] = 1000
    with pytest.raises(FetchError, match=r"could not fetch p/train.txt from http://\S+: .*1000 of"):
        fetch(item, tmp_path, retries=0, backoff=0)
    part = tmp_path / "p/train.txt.part"
    assert part.read_bytes() == TRAIN[:1000] and not (tmp_path / "p/train.txt").exists()

    assert fetch(item, tmp_path, retries=0, backoff=0).status == "fetched"
    assert server.requests[-1] == ("train.txt", "bytes=1000-")
    assert (tmp_path / "p/train.txt").read_bytes() == TRAIN and not part.exists()

    # within one run, the retry after a cut resumes too
    server.truncate["train.txt"] = 500
    assert fetch(item, tmp_path / "again", retries=1, backoff=0).status == "fetched"
    assert server.requests[-2:] == [("train.txt", None), ("train.txt", "bytes=500-")]
    assert (tmp_path / "again/p/train.txt").read_bytes() == TRAIN


def test_a_server_that_ignores_range_gives_the_whole_file(server, tmp_path) -> None:
    server.ignore_range = True
    part = tmp_path / "p/train.txt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 700)  # appended to, this would fail the digest
    assert (
        fetch(entry(server, "train.txt", "p/train.txt", digest(TRAIN)), tmp_path, backoff=0).status
        == "fetched"
    )
    assert server.requests == [("train.txt", "bytes=700-")]
    assert (tmp_path / "p/train.txt").read_bytes() == TRAIN


def test_transient_errors_are_retried_then_reported(server, tmp_path) -> None:
    server.fail["train.txt"] = 2
    assert (
        fetch(entry(server, "train.txt", "p/train.txt", None), tmp_path, retries=3, backoff=0).status
        == "recorded"
    )
    assert len(server.requests) == 3

    server.fail["meta.jsonl"] = 5
    with pytest.raises(FetchError) as info:
        fetch(entry(server, "meta.jsonl", "g/meta.jsonl", None), tmp_path, retries=2, backoff=0)
    assert str(info.value).startswith(f"could not fetch g/meta.jsonl from {server.url}/meta.jsonl: HTTP 500")
    assert "\n" not in str(info.value) and server.fail["meta.jsonl"] == 2  # 3 attempts

    server.requests.clear()  # a 404 is not transient: no retry
    with pytest.raises(FetchError, match="HTTP 404.*manifest's URL"):
        fetch(entry(server, "gone.txt", "gone.txt", None), tmp_path, retries=3, backoff=0)
    assert len(server.requests) == 1


def test_trust_on_first_use_detects_a_changed_file(server, tmp_path, capsys) -> None:
    """Decision: a final file that no longer matches its recorded digest is deleted and fetched again;
    the new copy must match the record, so a file that changed upstream stops with an error."""
    item = entry(server, "meta.jsonl", "g/meta.jsonl", None)
    assert fetch(item, tmp_path, backoff=0).status == "recorded"
    assert read_sums(tmp_path) == {"g/meta.jsonl": digest(METADATA)}

    final = tmp_path / "g/meta.jsonl"
    final.write_bytes(b"tampered\n")
    assert fetch(item, tmp_path, backoff=0).status == "fetched"
    assert final.read_bytes() == METADATA
    assert "does not match sha256" in capsys.readouterr().out

    server.content["meta.jsonl"] = b'{"prompt": "changed upstream"}\n'
    final.write_bytes(b"tampered again\n")
    with pytest.raises(FetchError, match=rf"sha256 mismatch .*recorded in .*{SUMS}.*delete its line") as info:
        fetch(item, tmp_path, backoff=0)
    assert "\n" not in str(info.value)
    assert not final.exists() and not (tmp_path / "g/meta.jsonl.part").exists()
    assert read_sums(tmp_path) == {"g/meta.jsonl": digest(METADATA)}  # the record is never rewritten


def test_only_selects_entries_and_rejects_unknown_names(server, tmp_path, monkeypatch) -> None:
    manifest = write_manifest(tmp_path / "manifest.yaml", server)
    root = tmp_path / "data"
    main(["--manifest", str(manifest), "--dest", str(root), "--only", "g/meta.jsonl"])
    assert (root / "g/meta.jsonl").exists() and not (root / "p/train.txt").exists()
    assert [name for name, _ in server.requests] == ["meta.jsonl"]

    with pytest.raises(ConfigError, match=r"--only: unknown names \['nope.txt'\]; the manifest lists"):
        main(["--manifest", str(manifest), "--dest", str(root), "--only", "nope.txt"])
    # on the command line that is one line, not a traceback
    monkeypatch.setattr(sys, "argv", ["paper_data", "--manifest", str(manifest), "--only", "nope.txt"])
    with pytest.raises(SystemExit) as info:
        run_cli(main)
    assert str(info.value.code).startswith("error: --only: unknown names")


def test_prompt_paths_resolve_as_given_then_under_the_data_root(tmp_path, monkeypatch) -> None:
    root = tmp_path / "root"
    (root / "pickscore").mkdir(parents=True)
    (root / "pickscore/train.txt").write_text("from the data root\n")
    monkeypatch.setenv(DATA_ENV, str(root))
    work = tmp_path / "work"
    (work / "pickscore").mkdir(parents=True)
    monkeypatch.chdir(work)

    assert data_file("pickscore/train.txt") == root / "pickscore/train.txt"
    assert read_prompts("pickscore/train.txt") == [{"prompt": "from the data root"}]
    (work / "pickscore/train.txt").write_text("from the cwd\n")  # an existing relative path wins
    assert data_file("pickscore/train.txt") == Path("pickscore/train.txt")
    assert data_file(str(root / "pickscore/train.txt")) == root / "pickscore/train.txt"

    with pytest.raises(FileNotFoundError) as info:
        read_prompts("geneval/test_metadata.jsonl")
    message = str(info.value)
    assert "\n" not in message and "make paper-data" in message
    assert (
        str(work / "geneval/test_metadata.jsonl") in message
        and str(root / "geneval/test_metadata.jsonl") in message
    )


def test_the_aesthetic_head_defaults_to_the_data_root(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(HEAD_ENV, raising=False)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "root"))
    assert default_head_path() == tmp_path / "root" / HEAD_FILE
    monkeypatch.delenv(DATA_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_head_path() == tmp_path / ".cache" / "rsm_bench" / HEAD_FILE  # as before the data root
    monkeypatch.setenv(HEAD_ENV, str(tmp_path / "elsewhere.pth"))
    assert default_head_path() == tmp_path / "elsewhere.pth"


def test_the_manifest_covers_the_paper_configs() -> None:
    manifest = load_manifest(MANIFEST)
    names = [item.name for item in manifest.files]
    assert len(names) == len(set(names))
    assert all(item.url.startswith("https://") for item in manifest.files)
    head = next(item for item in manifest.files if item.name == HEAD_FILE)  # where default_head_path looks
    assert head.sha256 == "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
    assert all(model["command"].startswith("hf download ") for model in manifest.models)
    for config in (
        "fig3/paper.yaml",
        "fig3/1gpu.yaml",
        "fig_zo_flow/paper.yaml",
        "fig5/paper.yaml",
        "fig6/paper.yaml",
    ):
        prompts = OmegaConf.load(CONFIGS / config).run.prompts
        assert {prompts.train_file, prompts.test_file} <= set(names), config
