"""Evaluation images on fixed noise and their grids: a run's start and end images differ only by what
training changed, and a figure's grid puts each arm's pair side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.image_grids import END, PAD, START, evaluation_images, figure_grid, has_grids, save_grid
from rsm_core.backbones.base import POLICY
from rsm_core.interfaces import Backbone
from rsm_core.world.assets import load_backbones

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a red circle", "a photo of two squares"]
STEPS, CFG = 4, 4.5


@pytest.fixture(scope="module")
def flow() -> tuple[Backbone, torch.Tensor]:
    """The shipped tiny flow model with a fresh policy adapter (gaussian init: LoRA B = 0), and the
    images of the model before it had one (the frozen reference) from seed 7's noise."""
    backbone = load_backbones().flow
    reference = evaluation_images(backbone, PROMPTS, STEPS, CFG, seed=7)
    torch.manual_seed(0)
    backbone.add_lora(4, 8.0, name=POLICY)
    return backbone, reference


def test_fixed_noise_gives_the_reference_images_at_the_start_and_training_changes_the_end(flow) -> None:
    backbone, reference = flow
    start = evaluation_images(backbone, PROMPTS, STEPS, CFG, seed=7)
    assert start.shape == (len(PROMPTS), 3, 32, 32) and start.min() >= 0 and start.max() <= 1
    assert torch.equal(start, reference)  # before training the policy is exactly the reference
    assert torch.equal(start, evaluation_images(backbone, PROMPTS, STEPS, CFG, seed=7))  # same noise
    assert not torch.equal(start, evaluation_images(backbone, PROMPTS, STEPS, CFG, seed=8))
    weights = backbone.adapter_parameters(POLICY)
    saved = [p.detach().clone() for p in weights]
    try:
        with torch.no_grad():
            for p in weights:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        end = evaluation_images(backbone, PROMPTS, STEPS, CFG, seed=7)
        assert (end - start).abs().max() > 1e-3  # a trained adapter changes the end images
    finally:
        with torch.no_grad():
            for p, value in zip(weights, saved, strict=True):
                p.copy_(value)
    assert torch.equal(evaluation_images(backbone, PROMPTS, STEPS, CFG, seed=7), start)


def test_save_grid_is_an_atomic_repeatable_png_of_upscaled_images(tmp_path: Path) -> None:
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    path = save_grid(images, tmp_path / "grid.png", captions=["one", "two", "a much longer third caption"])
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[1] > 3 * 96 and picture.shape[0] > 96  # upscaled 3x to >= 96 px, captions below
    # the first tile is the first image, upscaled by pixel repetition
    tile = (images[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().repeat(3, 0).repeat(3, 1)
    assert np.array_equal(picture[PAD : PAD + 96, PAD : PAD + 96], tile)
    first = path.read_bytes()
    save_grid(images, path, captions=["one", "two", "a much longer third caption"])
    assert path.read_bytes() == first  # no time stamp: the same images give the same file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]  # no temp file left
    big = save_grid(torch.zeros(1, 3, 512, 384), tmp_path / "big.png")  # paper scale: downsampled
    assert Image.open(big).size == (192 + 2 * PAD, 256 + 2 * PAD)
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        save_grid(images, tmp_path / "bad.png", captions=["one", "two"])


def _solid(color: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.float32).div(255).view(1, 3, 1, 1).expand(2, 3, 32, 32)


def _box(picture: np.ndarray, color: tuple[int, int, int]) -> tuple[int, int]:
    """Top-left corner of the pixels of ``color``."""
    rows, cols = np.nonzero((picture == np.array(color, dtype=np.uint8)).all(-1))
    assert len(rows), f"{color} not in the grid"
    return rows.min(), cols.min()


def test_figure_grid_rows_are_arms_and_columns_start_then_end(tmp_path: Path) -> None:
    colors = {"A": ((250, 0, 0), (0, 250, 0)), "B": ((0, 0, 250), (250, 250, 0))}
    for run, (start, end) in colors.items():
        save_grid(_solid(start), tmp_path / f"run-{run}" / START)
        assert not has_grids(tmp_path / f"run-{run}")
        save_grid(_solid(end), tmp_path / f"run-{run}" / END)
        assert has_grids(tmp_path / f"run-{run}")
    out = figure_grid(tmp_path, {"Arm A": "run-A", "Arm B": "run-B"}, tmp_path / "fig_images.png")
    picture = np.asarray(Image.open(out).convert("RGB"))
    (a_start, a_end), (b_start, b_end) = ([_box(picture, c) for c in pair] for pair in colors.values())
    assert a_start[0] == a_end[0] < b_start[0] == b_end[0]  # a row per run, in the order given
    assert a_start[1] == b_start[1] < a_end[1] == b_end[1]  # start left of end
    (tmp_path / "run-B" / END).unlink()
    with pytest.raises(FileNotFoundError, match=rf"run-B/{END}.*rerun"):
        figure_grid(tmp_path, ["run-A", "run-B"], tmp_path / "fig_images.png")
