"""A rule-based GenEval for the tiny world: palette segmentation, connected components, shape rules.

It plays the role of GenEval's detector + rules as a black-box, non-differentiable reward. Pixels are
lightly smoothed (so pixel noise does not break shapes apart), then matched to the nearest palette
colour; a pixel counts only when it is closer to a colour than halfway to the background (>= ~50%
coverage of an anti-aliased edge), so off-palette blur reads as background. Detections are in canvas
units (a 32-px reference) so the relation rule is resolution-independent.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from reward_models.base import check_geneval_batch
from rsm_core.world.scenes import BACKGROUND, CANVAS, COLORS, relation_holds

COLOR_NAMES = tuple(COLORS)
MIN_AREA = 8.0  # canvas units^2; smaller components are noise (smallest object is ~40)
# Soft fill on clean 32-px renders: square 0.999-1.0, circle 0.765-0.815, triangle 0.53-0.62.
SQUARE_FILL = 0.9  # at or above: square
CIRCLE_FILL = 0.69  # at or above (and below SQUARE_FILL): circle; below: triangle
MAX_DIST_RATIO = 0.5  # a pixel matches colour c if within this fraction of |c - background| of c
# Coverage below ALPHA_DEADZONE reads as 0 and above 1 - ALPHA_DEADZONE as 1 (linear between). Without
# it, pixel noise (a late SDE branch leaves std ~0.1) inflates the per-column maxima that measure width
# and deflates interior coverage, so squares read as circles; GenEval's detector is not that fragile.
ALPHA_DEADZONE = 0.3
# A Gaussian pre-smoothing (sigma in canvas units) averages pixel noise away before segmentation; with
# the dead zone, strict accuracy on clean renders stays 1.0 and is >= 0.97 per tag under N(0, 0.1^2)
# pixel noise (tests/test_world_data.py checks >= 0.9).
SMOOTH_SIGMA = 0.8
PALETTE = np.array([(BACKGROUND,) * 3, *COLORS.values()], dtype=np.float32)  # background first


def _to_hwc(images: Tensor) -> np.ndarray:
    """(B, H, W, 3) float32 numpy copy in [0, 1].

    The detector runs on numpy arrays: vectorised but single-threaded, because torch's intra-op
    threads cost more in synchronisation than they save on 32x32 images, badly so on a busy machine.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    array = images.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
    return np.clip(array, 0.0, 1.0)


def smooth(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (B, H, W, 3) pixels with edge padding; sigma in pixels."""
    radius = max(1, int(np.ceil(2.5 * sigma)))
    kernel = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma * sigma))
    kernel = (kernel / kernel.sum()).astype(np.float32)
    _, h, w, _ = pixels.shape
    padded = np.pad(pixels, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(k * padded[:, :, i : i + w] for i, k in enumerate(kernel))
    return sum(k * rows[:, i : i + h] for i, k in enumerate(kernel))


def classify_pixels(pixels: np.ndarray) -> np.ndarray:
    """(B, H, W) int64 from (B, H, W, 3): 0 for background or ambiguous, k + 1 for COLORS entry k."""
    dist = np.sqrt(((pixels[..., None, :] - PALETTE) ** 2).sum(-1))  # (B, H, W, 1 + C)
    nearest = dist.argmin(-1)
    best = np.take_along_axis(dist, nearest[..., None], -1)[..., 0]
    limit = MAX_DIST_RATIO * np.linalg.norm(PALETTE - PALETTE[0], axis=1)
    return np.where((nearest > 0) & (best <= limit[nearest]), nearest, 0)


def label_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-zero class, batched: each pixel gets its root's flat index.

    Labels start as the pixel's own flat index and take the minimum over same-class neighbours, with
    pointer jumping (a label is a pixel of the same component, so its label is no larger) to converge
    in a few sweeps. Background gets B*H*W.
    """
    fg = classes > 0
    n = classes.size
    labels = np.where(fg, np.arange(n).reshape(classes.shape), n)
    same_v = classes[:, 1:, :] == classes[:, :-1, :]
    same_h = classes[:, :, 1:] == classes[:, :, :-1]
    while True:
        new = labels.copy()
        np.minimum(new[:, 1:, :], np.where(same_v, labels[:, :-1, :], n), out=new[:, 1:, :])
        np.minimum(new[:, :-1, :], np.where(same_v, labels[:, 1:, :], n), out=new[:, :-1, :])
        np.minimum(new[:, :, 1:], np.where(same_h, labels[:, :, :-1], n), out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], np.where(same_h, labels[:, :, 1:], n), out=new[:, :, :-1])
        new[fg] = new.reshape(-1)[new[fg]]
        if np.array_equal(new, labels):
            return labels
        labels = new


def _ring_owner(labels: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Labels of the components plus, for each background pixel, the smallest 8-neighbouring label.

    The one-pixel ring holds an object's partly covered edge pixels, so soft features see all of it.
    """
    _, h, w = labels.shape
    padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=labels.size)
    ring = labels.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            np.minimum(ring, padded[:, dy : dy + h, dx : dx + w], out=ring)
    return np.where(fg, labels, ring)


def component_features(pixels: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per component: image index, colour index, soft area, soft width/height and centre, in pixels.

    Alpha (coverage) comes from projecting each pixel onto the background-to-colour line, then the dead
    zone above. Width is the sum over columns of the largest alpha in that column (exact for a box,
    slightly short for round or pointed ends), and the centre is the centroid of that column profile
    (likewise rows).
    """
    _, h, w = classes.shape
    owner = _ring_owner(labels, classes > 0)
    valid = owner < classes.size
    own = owner[valid]
    roots, inverse = np.unique(own, return_inverse=True)
    k = roots.size
    direction = PALETTE[classes.reshape(-1)[own]] - PALETTE[0]
    alpha = ((pixels[valid] - PALETTE[0]) * direction).sum(-1) / (direction * direction).sum(-1)
    alpha = np.clip((alpha - ALPHA_DEADZONE) / (1 - 2 * ALPHA_DEADZONE), 0.0, 1.0).astype(np.float64)
    flat_index = np.flatnonzero(valid)
    ys, xs = (flat_index // w) % h, flat_index % w
    area = np.bincount(inverse, weights=alpha, minlength=k)
    cols, rows = np.zeros(k * w), np.zeros(k * h)
    np.maximum.at(cols, inverse * w + xs, alpha)
    np.maximum.at(rows, inverse * h + ys, alpha)
    cols, rows = cols.reshape(k, w), rows.reshape(k, h)
    width, height = cols.sum(1), rows.sum(1)
    return {
        "image": roots // (h * w),
        "color": classes.reshape(-1)[roots] - 1,
        "area": area,
        "width": width,
        "height": height,
        "cx": (cols * (np.arange(w) + 0.5)).sum(1) / np.maximum(width, 1e-6),
        "cy": (rows * (np.arange(h) + 0.5)).sum(1) / np.maximum(height, 1e-6),
    }


def shape_of(fill: float) -> str:
    """Shape from the fraction of its soft bounding box a blob fills (see the thresholds above)."""
    if fill >= SQUARE_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_FILL else "triangle"


def detect(images: Tensor, min_area: float = MIN_AREA) -> list[list[dict]]:
    """Per image, detections {class, color, cx, cy, area} in canvas units, largest first."""
    pixels = _to_hwc(images)
    batch, h, w, _ = pixels.shape
    pixels = smooth(pixels, SMOOTH_SIGMA * w / CANVAS)
    classes = classify_pixels(pixels)
    feats = component_features(pixels, classes, label_components(classes))
    fill = feats["area"] / np.maximum(feats["width"] * feats["height"], 1e-6)
    sx, sy = CANVAS / w, CANVAS / h
    out: list[list[dict]] = [[] for _ in range(batch)]
    columns = [feats[key].tolist() for key in ("image", "color", "area", "cx", "cy")] + [fill.tolist()]
    for i, c, a, x, y, f in zip(*columns, strict=True):
        if a * sx * sy < min_area:
            continue
        out[i].append(
            {"class": shape_of(f), "color": COLOR_NAMES[c], "cx": x * sx, "cy": y * sy, "area": a * sx * sy}
        )
    for dets in out:
        dets.sort(key=lambda d: -d["area"])
    return out


def score(meta: dict, detections: list[dict]) -> tuple[float, float]:
    """(strict, partial) by GenEval's rules: strict needs every check, partial is the fraction passed.

    Checks: per include item its class count (and colour count, and relation to the matched objects of
    the item it points at, if given); per exclude item fewer than `count` of its class.
    """
    checks: list[bool] = []
    matched: list[list[dict] | None] = []
    for item in meta.get("include", []):
        count = int(item["count"])
        found = [d for d in detections if d["class"] == item["class"]]
        checks.append(len(found) >= count)
        if "color" in item:
            found = [d for d in found if d["color"] == item["color"]]
            checks.append(len(found) >= count)
        ok = len(found) >= count
        found = found[:count]
        if "position" in item:
            rel, target = item["position"]
            group = matched[target] if 0 <= target < len(matched) else None
            holds = (
                ok
                and group is not None
                and all(
                    relation_holds(rel, (b["cx"], b["cy"]), (a["cx"], a["cy"])) for b in found for a in group
                )
            )
            checks.append(holds)
            ok = holds
        matched.append(found if ok else None)
    for item in meta.get("exclude", []):
        checks.append(sum(d["class"] == item["class"] for d in detections) < int(item["count"]))
    if not checks:
        raise ValueError(f"metadata {meta.get('prompt')!r} has nothing to check")
    return float(all(checks)), sum(checks) / len(checks)


class ShapesGenEval:
    """Black-box GenEval-like reward on tiny-world images; needs each prompt's GenEval metadata."""

    name = "shapes_geneval"
    differentiable = False

    def __init__(self, mode: str = "strict") -> None:
        if mode not in ("strict", "partial"):
            raise ValueError(f"mode must be 'strict' or 'partial', got {mode!r}")
        self.mode = mode

    def detect(self, images: Tensor) -> list[list[dict]]:
        return detect(images)

    def __call__(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        """(B,) float32 strict or partial scores."""
        meta = check_geneval_batch(images, prompts, meta)
        pick = 0 if self.mode == "strict" else 1
        scores = [score(m, d)[pick] for m, d in zip(meta, self.detect(images), strict=True)]
        return torch.tensor(scores, dtype=torch.float32)

    def evaluate(self, images: Tensor, metas: list[dict]) -> dict[str, dict[str, float]]:
        """Per-tag mean strict and partial scores, plus 'overall' = mean over tags (GenEval's summary)."""
        if len(metas) != images.shape[0]:
            raise ValueError(f"length mismatch: {images.shape[0]} images, {len(metas)} metadata")
        per_tag: dict[str, list[tuple[float, float]]] = {}
        for m, d in zip(metas, self.detect(images), strict=True):
            per_tag.setdefault(m.get("tag", "untagged"), []).append(score(m, d))
        result = {
            tag: {
                "strict": sum(s for s, _ in v) / len(v),
                "partial": sum(p for _, p in v) / len(v),
                "n": float(len(v)),
            }
            for tag, v in per_tag.items()
        }
        if result:
            result["overall"] = {
                key: sum(r[key] for r in result.values()) / len(result) for key in ("strict", "partial")
            }
        return result
