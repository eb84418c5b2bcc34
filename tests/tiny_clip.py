"""Helpers for the CLIP-based rewards' tests (PickScore, HPSv2): a tiny CLIP BPE tokenizer saved as a Hub
repo holds it, and a fake local Hugging Face cache (nothing is downloaded, the real cache is never read)."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

CHARS = string.ascii_lowercase + string.digits
VOCAB_SIZE = 2 * len(CHARS) + 2  # each character alone and word-final, then <|startoftext|>, <|endoftext|>
BOS_ID, EOS_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1  # the end-of-text token has the largest id, as in CLIP


def tokenizer_files(directory: Path) -> None:
    """A CLIP BPE tokenizer over single characters (vocab.json, merges.txt), saved by transformers."""
    from transformers import CLIPTokenizer

    vocab = {token: i for i, token in enumerate([*CHARS, *(c + "</w>" for c in CHARS)])}
    vocab |= {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
    source = directory / "source"
    source.mkdir()
    (source / "vocab.json").write_text(json.dumps(vocab))
    (source / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(source / "vocab.json"), str(source / "merges.txt")).save_pretrained(directory)
    shutil.rmtree(source)


def fake_hub_cache(cache: Path, repos: dict[str, Path]) -> None:
    """The Hugging Face cache layout: models--org--name/refs/main -> snapshots/<commit>/ with the files."""
    commit = "0" * 40
    for repo, files in repos.items():
        storage = cache / f"models--{repo.replace('/', '--')}"
        (storage / "refs").mkdir(parents=True)
        (storage / "refs" / "main").write_text(commit)
        shutil.copytree(files, storage / "snapshots" / commit)


def use_cache(monkeypatch, cache: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
