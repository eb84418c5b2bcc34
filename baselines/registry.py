"""Every published method the harness knows, with its declared RSM reduction (Table 1's rows)."""

from __future__ import annotations

from baselines import (
    branch_grpo,
    grpo,
    grpo_guard,
    pcpo,
    reinforce,
    residual_nabla_db,
    sqdf,
    tempflow_grpo,
    vgg_flow,
)
from baselines.method import Method

METHODS: tuple[Method, ...] = (
    vgg_flow.METHOD,
    sqdf.METHOD,
    residual_nabla_db.METHOD,
    reinforce.METHOD,
    *grpo.METHODS,
    *pcpo.METHODS,
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
