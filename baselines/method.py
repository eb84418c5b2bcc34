"""What a method module declares: its native loss, its RSM reduction, its row of Table 1 (baselines)
and how it trains (the rsm_core arm kind, the method's settings of it, its KL and diagnostics).

The reduction is given in native-output units, (C1 kappa^2, kappa G, P kappa^2), and the canonical
loss ``rsm_core.loss.rsm_loss`` is evaluated on native outputs with them: since
s_theta - s_phi = kappa (f_theta - f_phi) this is the score-space loss of theory spec §2.4 term by
term, and it stays finite at t = 1 of rectified flow where kappa = 0 and b is infinite. The table
cells are the score-space coefficients as the paper prints them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import Tensor

from rsm_core.grids import Grid
from rsm_core.interfaces import Objective
from rsm_core.loss import Coefficients, Surrogate
from rsm_core.transitions import Transitions

LossFn = Callable[[Tensor, Transitions, Any], Surrogate]  # (f_theta, rows, config) -> per-sample loss
CoefficientsFn = Callable[[Tensor, Transitions, Any, Tensor], Coefficients]  # + the active mask
KLFn = Callable[[Tensor, Transitions, Any], Tensor]  # (f_theta, rows, config) -> per-row KL to the reference
# (f_theta, rows, config, the loss's surrogate) -> per-row diagnostics, e.g. the published clipfrac
DiagnosticsFn = Callable[[Tensor, Transitions, Any, Surrogate], dict[str, Tensor]]


class Relation(str, Enum):
    """How the native gradient equals the canonical one (what the checker asserts)."""

    EXACT = "exact at every theta"
    RATIO_FACTOR = "exact with the stop-gradient ratio sg(rho) folded into G and P per sample"
    CURRENT_THETA = "exact with the reward gradient taken at the current theta"
    NOT_REDUCED = "not reduced"


class Family(str, Enum):
    BASELINE = "baseline"  # a published method, as its authors wrote it (a row of Table 1)
    REDESIGN = "redesign"  # the paper's redesign: a configuration of rsm_core parts


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
    relation: Relation
    table: TableRow | None = None  # its row of Table 1 (baselines)
    family: Family = Family.BASELINE
    signal: Signal | None = None
    config: Any = None  # the published hyperparameters of the loss (a frozen dataclass)
    loss: LossFn | None = None
    coefficients: CoefficientsFn | None = None
    needs: tuple[str, ...] = ()  # Transitions fields the loss reads
    note: str = ""
    # --- training: which rsm_core arm kind runs it, and the method's own settings of that kind ---
    arm: str | None = None  # a kind of rsm_core.arms.KINDS; None: not trainable yet
    arm_config: dict[str, Any] = field(default_factory=dict)  # e.g. its branching profile
    kl: KLFn | None = None  # per-row KL to the reference, for rows the loss does not see (anchors)
    diagnostics: DiagnosticsFn | None = None

    @property
    def reduced(self) -> bool:
        return self.relation is not Relation.NOT_REDUCED

    @property
    def trainable(self) -> bool:
        return self.arm is not None

    def objective(self, config: Any = None) -> Objective:
        """The method's per-row pieces bound to ``config`` (default: the published one), for an arm."""
        if not self.trainable or self.loss is None:
            raise ValueError(f"{self.name} cannot be trained yet: it declares no arm kind or loss")
        config = self.config if config is None else config
        loss, kl, diagnostics = self.loss, self.kl, self.diagnostics
        return Objective(
            name=self.name,
            loss=lambda f_theta, rows: loss(f_theta, rows, config),
            kl=None if kl is None else lambda f_theta, rows: kl(f_theta, rows, config),
            beta=float(getattr(config, "beta", 0.0)),
            diagnostics=None
            if diagnostics is None
            else lambda f_theta, rows, surrogate: diagnostics(f_theta, rows, config, surrogate),
            needs=self.needs,
        )
