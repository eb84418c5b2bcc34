"""Deterministic renderer of flat-colour shape scenes, and a sampler of scenes that satisfy a prompt.

Geometry lives in units of a 32-px canvas so a scene looks the same at any resolution. The relation
rule is defined here once and shared by the sampler and the detector, so "left of" means one thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

CANVAS = 32.0  # reference canvas size; all geometry is expressed in these units
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.80, 0.10),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.70, 0.15, 0.80),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUND = 0.15  # mean grey level of the background
BACKGROUND_GRADIENT = 0.02  # top-to-bottom change; faint, so the detector can treat it as flat grey

RELATION_MARGIN = 3.0  # the primary-axis offset a relation needs, canvas units
SAMPLER_SLACK = 2.0  # extra room the sampler keeps so pixel quantisation cannot flip a relation
# Layout. A lone object sits near the centre; two to four objects each take one cell of a 2x2 grid,
# jittered. Discrete slots keep objects apart and equally sized, so a 1 M-parameter model trained for
# minutes can learn shapes and bindings; relations stay GenEval's (the rule below decides them).
SIZE_SINGLE = (6.0, 8.0)  # half-extent range of a lone object
SINGLE_JITTER = 3.0  # a lone object's centre is within this of the canvas centre
SIZE_SLOT = (4.5, 5.5)  # half-extent range of objects in grid cells
SLOT_CENTRES = (8.0, 24.0)  # cell centres along each axis
SLOT_JITTER = 1.0
MAX_TRIES = 5000


@dataclass(frozen=True)
class Obj:
    """One shape; centre and half-extent in canvas units (a circle's radius, half a square's side)."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    """Objects in drawing order: later ones are painted on top."""

    objects: tuple[Obj, ...]


def relation_holds(
    rel: str,
    b: tuple[float, float],
    a: tuple[float, float],
    margin: float = RELATION_MARGIN,
    slack: float = 0.0,
) -> bool:
    """Whether point b is `rel` point a: an offset beyond the margin on the dominant axis.

    y grows downwards, so "above" means a smaller y. `slack` tightens both conditions.
    """
    dx, dy = b[0] - a[0], b[1] - a[1]
    if rel in ("left of", "right of"):
        primary, secondary = (-dx if rel == "left of" else dx), dy
    elif rel in ("above", "below"):
        primary, secondary = (-dy if rel == "above" else dy), dx
    else:
        raise ValueError(f"unknown relation {rel!r}; expected one of {RELATIONS}")
    return primary > margin + slack and abs(secondary) + slack < abs(primary)


def _shape_mask(obj: Obj, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean coverage of one shape on a grid of sample points (canvas units)."""
    dx, dy = xs - obj.cx, ys - obj.cy
    s = obj.size
    if obj.shape == "circle":
        return dx * dx + dy * dy <= s * s
    if obj.shape == "square":
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if obj.shape == "triangle":  # apex up, base at the bottom of the box, so its box is 2s x 2s
        return (dy <= s) & (np.abs(dx) <= (dy + s) / 2)
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = 32, antialias: int = 4) -> Tensor:
    """(3, size, size) float32 image in [0, 1], anti-aliased by supersampling then average pooling.

    Drawn in numpy: torch's intra-op threads only add synchronisation cost on images this small.
    """
    n = size * antialias
    coords = (np.arange(n, dtype=np.float32) + 0.5) * np.float32(CANVAS / n)
    ys, xs = coords[:, None], coords[None, :]
    grey = BACKGROUND + BACKGROUND_GRADIENT * (ys / CANVAS - 0.5)
    canvas = np.repeat(np.broadcast_to(grey, (n, n))[None], 3, axis=0).astype(np.float32)
    for obj in scene.objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; expected one of {tuple(COLORS)}")
        mask = _shape_mask(obj, xs, ys)
        for channel, value in enumerate(COLORS[obj.color]):
            canvas[channel][mask] = value
    image = canvas.reshape(3, size, antialias, size, antialias).mean(axis=(2, 4), dtype=np.float64)
    return torch.from_numpy(np.clip(image, 0.0, 1.0).astype(np.float32))


def render_batch(scenes: Sequence[Scene], size: int = 32) -> Tensor:
    """(B, 3, size, size) stack of `render`."""
    return torch.stack([render(scene, size) for scene in scenes]) if scenes else torch.zeros(0, 3, size, size)


def _object_specs(meta: dict, rng: np.random.Generator) -> tuple[list[tuple[str, str]], list[int]]:
    """(shape, colour) per object to draw and the include item each one belongs to."""
    specs, groups = [], []
    for index, item in enumerate(meta["include"]):
        if item["class"] not in SHAPES:
            raise ValueError(f"unknown class {item['class']!r} in {meta.get('prompt')!r}")
        for _ in range(int(item["count"])):
            color = item.get("color") or str(rng.choice(list(COLORS)))
            if color not in COLORS:
                raise ValueError(f"unknown colour {color!r} in {meta.get('prompt')!r}")
            specs.append((item["class"], color))
            groups.append(index)
    return specs, groups


def _relations_hold(meta: dict, objects: list[Obj], groups: list[int]) -> bool:
    """Every position requirement holds for every pair of objects it mentions, with sampler slack."""
    for index, item in enumerate(meta["include"]):
        if "position" not in item:
            continue
        rel, target = item["position"]
        subjects = [o for o, g in zip(objects, groups, strict=True) if g == index]
        targets = [o for o, g in zip(objects, groups, strict=True) if g == target]
        for b in subjects:
            for a in targets:
                if not relation_holds(rel, (b.cx, b.cy), (a.cx, a.cy), slack=SAMPLER_SLACK):
                    return False
    return True


def _place(specs: list[tuple[str, str]], rng: np.random.Generator) -> list[Obj]:
    """One random layout: a lone object near the centre, or distinct jittered cells of the 2x2 grid."""
    if len(specs) == 1:
        shape, color = specs[0]
        cx, cy = CANVAS / 2 + rng.uniform(-SINGLE_JITTER, SINGLE_JITTER, size=2)
        return [Obj(shape, color, float(cx), float(cy), float(rng.uniform(*SIZE_SINGLE)))]
    cells = [(x, y) for y in SLOT_CENTRES for x in SLOT_CENTRES]
    objects = []
    for (shape, color), cell in zip(specs, rng.permutation(len(cells)), strict=False):
        cx, cy = np.asarray(cells[cell]) + rng.uniform(-SLOT_JITTER, SLOT_JITTER, size=2)
        objects.append(Obj(shape, color, float(cx), float(cy), float(rng.uniform(*SIZE_SLOT))))
    return objects


def sample_scene(meta: dict, rng: np.random.Generator, max_tries: int = MAX_TRIES) -> Scene:
    """A random scene with exactly the included objects, in separate cells, obeying any relation."""
    specs, groups = _object_specs(meta, rng)
    if not specs:
        raise ValueError(f"metadata {meta.get('prompt')!r} includes no objects")
    if len(specs) <= len(SLOT_CENTRES) ** 2:
        for _ in range(max_tries):
            objects = _place(specs, rng)
            if _relations_hold(meta, objects, groups):
                return Scene(tuple(objects))
    raise ValueError(f"could not place the objects of {meta.get('prompt')!r} after {max_tries} tries")
