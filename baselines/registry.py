"""THE list of methods the harness knows: every published baseline (Table 1's rows) and the paper's
redesigns, each with its declared RSM reduction and, where it trains, its arm kind.

Training (``experiments.run``), Table 1, the influence figure and the tests all read this list.
"""

from __future__ import annotations

from baselines import (
    branch_grpo,
    grpo,
    grpo_guard,
    pcpo,
    reinforce,
    residual_nabla_db,
    sparse_branching,
    sqdf,
    tempflow_grpo,
    vgg_flow,
)
from baselines.method import Family, Method

METHODS: tuple[Method, ...] = (
    *vgg_flow.METHODS,
    sqdf.METHOD,
    *residual_nabla_db.METHODS,
    reinforce.METHOD,
    *grpo.METHODS,
    *pcpo.METHODS,
    sparse_branching.METHOD,
    grpo_guard.METHOD,
    *tempflow_grpo.METHODS,
    branch_grpo.METHOD,
)


def get(name: str) -> Method:
    for method in METHODS:
        if method.name == name:
            return method
    raise KeyError(f"no method {name!r}; known methods: {', '.join(m.name for m in METHODS)}")


def reduced() -> tuple[Method, ...]:
    return tuple(m for m in METHODS if m.reduced)


def published() -> tuple[Method, ...]:
    """The rows of Table 1: the baselines as the RSM configs run them (the unpruned originals of the
    first-order baselines and the TempFlow-GRPO trainer's GRPO-Guard and PCPO reweights are trainable
    baselines without a row of their own)."""
    return tuple(m for m in METHODS if m.family is Family.BASELINE and m.table is not None)


def trainable() -> tuple[Method, ...]:
    """Every method an rsm_core arm kind can train today."""
    return tuple(m for m in METHODS if m.trainable)
