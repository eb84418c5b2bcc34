"""Evaluation images on fixed prompts and noise, and the grids a researcher looks at.

Every run saves ``eval_grid_start.png`` (before training: the policy equals the reference, LoRA B = 0)
and ``eval_grid_end.png`` (after its last epoch) from the same prompts and the same noise, so any
difference is the fine-tuning's. A figure's ``<figure>_images.png`` puts each arm's pair side by side,
to judge by eye whether a reward gain looks like reward hacking. Images are drawn with PIL at a size
made to be looked at: the tiny world's 32 px images upscaled (nearest-neighbour), paper-scale ones
downsampled, so a grid stays small.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from rsm_core.interfaces import Backbone
from rsm_core.records import atomic_write_bytes

START, END = "eval_grid_start.png", "eval_grid_end.png"
MIN_TILE = 96  # pixels: smaller images are upscaled by a whole factor to at least this side
MAX_TILE = 256  # pixels: larger ones (paper scale: 512 or 1024) are downsampled to this side
PAD = 4
GAP = 16  # between the start and the end column of a figure grid
FONT_SIZE = 11
BACKGROUND = (255, 255, 255)


@torch.no_grad()
def evaluation_images(
    backbone: Backbone, prompts: list[str], steps: int, cfg: float | None, seed: int
) -> Tensor:
    """Images in [0, 1], (len(prompts), C, H, W) on the CPU, from the backbone's ODE sampler with its
    current adapter (call it under the weights the run evaluates, e.g. the EMA) from noise drawn by
    ``torch.Generator().manual_seed(seed)``: the same seed gives the same noise at a run's start and end."""
    if not prompts:
        raise ValueError("evaluation_images needs at least one prompt")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), *backbone.latent_shape, generator=generator)
    latents = backbone.sample_ode(prompts, steps, cfg, start=noise)
    return backbone.decode(latents).float().clamp(0, 1).cpu()


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)


def _to_pil(image: Tensor, size: tuple[int, int]) -> Image.Image:
    """One (C, H, W) image in [0, 1] as an RGB PIL image of ``size`` (width, height)."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W); got one of shape {tuple(image.shape)}")
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).expand(3, -1, -1)
    picture = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    if picture.size == size:
        return picture
    smaller = size[0] < picture.width
    return picture.resize(size, Image.Resampling.BOX if smaller else Image.Resampling.NEAREST)


def tile_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) of a tile: upscaled by a whole factor to at least MIN_TILE (pixels stay crisp),
    or downsampled to at most MAX_TILE, keeping the aspect ratio."""
    side = max(height, width)
    scale = math.ceil(MIN_TILE / side) if side < MIN_TILE else min(1.0, MAX_TILE / side)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _wrap(text: str, width_px: int, font) -> list[str]:
    """``text`` in lines no wider than ``width_px`` (a single over-long word keeps its own line)."""
    chars = max(1, width_px // max(1, round(font.getlength("x"))))
    while chars > 1:
        lines = textwrap.wrap(text, chars) or [""]
        if all(font.getlength(line) <= width_px for line in lines):
            return lines
        chars -= 1
    return textwrap.wrap(text, 1) or [""]


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")  # PIL writes no time stamp: the same pixels give the same bytes
    return buffer.getvalue()


def save_grid(
    images: Tensor, path: Path, captions: Sequence[str] | None = None, columns: int | None = None
) -> Path:
    """A PNG of ``images`` (N, C, H, W in [0, 1]) in rows of ``columns`` (default: all in one row),
    each with its caption (e.g. its prompt) below; written atomically."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"expected a batch of images (N, C, H, W) with N >= 1; got shape {tuple(images.shape)}"
        )
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images: give one caption per image")
    columns = min(columns or len(images), len(images))
    size = tile_size(*images.shape[-2:])
    tiles = [_to_pil(image, size) for image in images]
    font = _font()
    width, height = tiles[0].size
    lines = [_wrap(caption, width, font) for caption in captions] if captions is not None else []
    line_height = FONT_SIZE + 2
    caption_height = max((len(wrapped) for wrapped in lines), default=0) * line_height
    cell_w, cell_h = width + PAD, height + caption_height + PAD
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new("RGB", (columns * cell_w + PAD, rows * cell_h + PAD), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        x, y = PAD + (i % columns) * cell_w, PAD + (i // columns) * cell_h
        grid.paste(tile, (x, y))
        for j, line in enumerate(lines[i] if lines else []):
            draw.text((x, y + height + j * line_height), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, _png(grid))
    return path


def has_grids(run_dir: Path) -> bool:
    """Whether a run saved both its evaluation grids (runs made before they existed did not)."""
    return all((Path(run_dir) / name).is_file() for name in (START, END))


def figure_grid(sweep_dir: Path, runs: Sequence[str] | Mapping[str, str], out: Path) -> Path:
    """One image of a figure's runs: a row per run (labelled with its arm, or its run name for a list),
    columns start | end (each run's own eval_grid_start.png and eval_grid_end.png); written atomically."""
    labelled = dict(runs) if isinstance(runs, Mapping) else {run: run for run in runs}
    if not labelled:
        raise ValueError("figure_grid needs at least one run")
    sweep_dir = Path(sweep_dir)
    files = {label: (sweep_dir / run / START, sweep_dir / run / END) for label, run in labelled.items()}
    missing = [str(path) for pair in files.values() for path in pair if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"evaluation grids missing: {', '.join(missing)}. A run writes {START} before training and "
            f"{END} when it completes; finish (rerun) those runs, or leave them out of the figure grid"
        )
    pictures = {label: [Image.open(path).convert("RGB") for path in pair] for label, pair in files.items()}
    font = _font()
    cell_w = max(p.width for pair in pictures.values() for p in pair)
    cell_h = max(p.height for pair in pictures.values() for p in pair)
    label_w = min(240, max(round(font.getlength(label)) for label in labelled) + 2 * PAD)
    header = FONT_SIZE + 2 * PAD
    column_x = [label_w + PAD, label_w + PAD + cell_w + GAP]
    size = (column_x[1] + cell_w + PAD, header + len(pictures) * (cell_h + PAD))
    grid = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(grid)
    divider = column_x[1] - GAP // 2
    draw.line([(divider, PAD), (divider, size[1] - PAD)], fill=(160, 160, 160), width=1)
    for x, title in zip(column_x, ("start (before training)", "end (after the last epoch)"), strict=True):
        draw.text((x, PAD), title, fill=(0, 0, 0), font=font)
    for r, (label, pair) in enumerate(pictures.items()):
        y = header + r * (cell_h + PAD)
        for j, line in enumerate(_wrap(label, label_w - 2 * PAD, font)):
            draw.text((PAD, y + j * (FONT_SIZE + 2)), line, fill=(0, 0, 0), font=font)
        for x, picture in zip(column_x, pair, strict=True):
            grid.paste(picture, (x, y))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, _png(grid))
    return out
