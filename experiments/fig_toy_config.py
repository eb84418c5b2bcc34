"""The toy figure's structured config; scale overlays live in experiments/configs/fig_toy/<scale>.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from rsm_core.toy.assets import TrainSettings


class Mode(str, Enum):
    trained = (
        "trained"  # the paper's: two learned epsilon networks (their Tweedie error is the point of panel b)
    )
    oracle = "oracle"  # analytic mixture scores: every estimator's only error is its own bias and variance


class ScaleConvention(str, Enum):
    exact = "exact"  # nu_1^2 / b_1 of the step taken, as Prop. 3.1 requires
    official = "official"  # the released toy code: 0.98799 on full rollouts, 1.0 on lookahead


@dataclass
class TrainConfig:
    iterations: int = TrainSettings.iterations
    batch_size: int = TrainSettings.batch_size
    lr: float = TrainSettings.lr
    seed: int = TrainSettings.seed


@dataclass
class FigToyConfig:
    mode: Mode = Mode.trained
    scale_convention: ScaleConvention = ScaleConvention.exact
    points: int = 30  # fixed evaluation points x_t ~ p*_t at t = 389
    log2_samples: list[int] = field(default_factory=lambda: [4, 6, 8, 10, 12])
    zm_reference_log2: int = 14  # particles for the localised estimator's own reference (panel c-iii)
    lookahead_ratios: list[float] = field(default_factory=lambda: [0.9, 0.8, 0.5])
    branch_patterns: list[list[int]] = field(default_factory=lambda: [[1, 1], [2, 2], [3, 2], [4, 2], [2, 4]])
    soft_return: bool = True  # add the entropy-augmented zeroth-order curve to panel b
    seed: int = 0
    max_rows: int = 131072  # states simulated at once; bounds memory, results do not depend on it
    device: str = "cpu"  # "auto" picks cuda when available
    retrain: bool = False  # train fresh denoisers instead of loading the shipped ones
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: bool = True  # mirror the run to wandb (offline unless WANDB_MODE says otherwise)
