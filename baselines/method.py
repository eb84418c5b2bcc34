"""What a baseline module declares: its native loss, its RSM reduction and its row of Table 1.

The reduction is given in native-output units, (C1 kappa^2, kappa G, P kappa^2), and the canonical
loss ``rsm_core.loss.rsm_loss`` is evaluated on native outputs with them: since
s_theta - s_phi = kappa (f_theta - f_phi) this is the score-space loss of theory spec §2.4 term by
term, and it stays finite at t = 1 of rectified flow where kappa = 0 and b is infinite. The table
cells are the score-space coefficients as the paper prints them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch import Tensor

from rsm_core.grids import Grid
from rsm_core.loss import Coefficients, Surrogate
from rsm_core.transitions import Transitions

LossFn = Callable[[Tensor, Transitions, Any], Surrogate]  # (f_theta, rows, config) -> per-sample loss
CoefficientsFn = Callable[[Tensor, Transitions, Any, Tensor], Coefficients]  # + the active mask


class Relation(str, Enum):
    """How the native gradient equals the canonical one (what the checker asserts)."""

    EXACT = "exact at every theta"
    RATIO_FACTOR = "exact with the stop-gradient ratio sg(rho) folded into G and P per sample"
    CURRENT_THETA = "exact with the reward gradient taken at the current theta"
    NOT_REDUCED = "not reduced"


class Signal(str, Enum):
    """The reward-gradient signal g_hat that G is proportional to (for the influence metric)."""

    STEIN = "A eps / nu"  # zeroth order: the Stein direction of the step's noise
    REWARD_GRADIENT = "reward gradient"  # first order: the rows' reward_grad


@dataclass(frozen=True)
class TableRow:
    """One row of Table 1 (cells are LaTeX math, score-space coefficients)."""

    estimator: str
    lookahead: str
    branching: str
    temporal_weight: str
    trust_region: str
    c1: str
    g: str
    p: str


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    grid: Callable[[], Grid]  # the method's own paper schedule (trained transitions)
    table: TableRow
    relation: Relation
    signal: Signal | None = None
    config: Any = None  # the published hyperparameters
    loss: LossFn | None = None
    coefficients: CoefficientsFn | None = None
    needs: tuple[str, ...] = ()  # Transitions fields the loss reads
    note: str = ""

    @property
    def reduced(self) -> bool:
        return self.relation is not Relation.NOT_REDUCED
