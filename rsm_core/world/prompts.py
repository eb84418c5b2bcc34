"""GenEval-format prompt metadata for the tiny world: enumeration, a stratified split and JSONL I/O.

Entries use GenEval's keys (tag, include, exclude, prompt) so the scorer follows GenEval's rules
unchanged. Unordered pairs are enumerated once, so a test prompt is never a reordering of a train one.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from rsm_core.records import atomic_write_text
from rsm_core.world.scenes import COLORS, RELATIONS, SHAPES

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {2: "two", 3: "three", 4: "four"}
PLURALS = {shape: shape + "s" for shape in SHAPES}


def _single_object() -> list[dict]:
    return [
        {"tag": "single_object", "include": [{"class": s, "count": 1}], "prompt": f"a photo of a {s}"}
        for s in SHAPES
    ]


def _two_object() -> list[dict]:
    return [
        {
            "tag": "two_object",
            "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of a {a} and a {b}",
        }
        for a, b in itertools.combinations(SHAPES, 2)
    ]


def _counting() -> list[dict]:
    return [
        {
            "tag": "counting",
            "include": [{"class": s, "count": n}],
            "exclude": [{"class": s, "count": n + 1}],
            "prompt": f"a photo of {word} {PLURALS[s]}",
        }
        for s in SHAPES
        for n, word in NUMBERS.items()
    ]


def _colors() -> list[dict]:
    return [
        {
            "tag": "colors",
            "include": [{"class": s, "count": 1, "color": c}],
            "prompt": f"a photo of a {c} {s}",
        }
        for s in SHAPES
        for c in COLORS
    ]


def _position() -> list[dict]:
    return [
        {
            "tag": "position",
            "include": [{"class": a, "count": 1}, {"class": b, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of a {b} {rel} a {a}",
        }
        for a, b in itertools.permutations(SHAPES, 2)
        for rel in RELATIONS
    ]


def _color_attr() -> list[dict]:
    return [
        {
            "tag": "color_attr",
            "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            "prompt": f"a photo of a {ca} {a} and a {cb} {b}",
        }
        for a, b in itertools.combinations(SHAPES, 2)
        for ca, cb in itertools.permutations(COLORS, 2)
    ]


def all_metadata() -> list[dict]:
    """Every distinct prompt of every tag, in TAGS order then enumeration order."""
    return _single_object() + _two_object() + _counting() + _colors() + _position() + _color_attr()


def split(seed: int = 0, test_fraction: float = 0.25) -> tuple[list[dict], list[dict]]:
    """Disjoint (train, test) lists, stratified so every tag has at least one prompt on each side."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    entries = all_metadata()
    test_prompts: set[str] = set()
    for tag in TAGS:
        prompts = [e["prompt"] for e in entries if e["tag"] == tag]
        n_test = min(max(round(len(prompts) * test_fraction), 1), len(prompts) - 1)
        test_prompts.update(prompts[i] for i in rng.permutation(len(prompts))[:n_test])
    train = [e for e in entries if e["prompt"] not in test_prompts]
    test = [e for e in entries if e["prompt"] in test_prompts]
    return train, test


def vocabulary() -> list[str]:
    """Every word of every prompt, sorted: the text side of the tiny world is this closed set."""
    return sorted({word for e in all_metadata() for word in e["prompt"].lower().split(" ")})


def write_jsonl(path: str | os.PathLike, entries: Iterable[dict]) -> None:
    """One JSON object per line, written atomically so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(entry) + "\n" for entry in entries))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The entries of a JSONL file, skipping blank lines."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
