"""Arm kinds: how a family of methods collects rows and turns them into a loss, whatever the method.

A method's registry entry names its kind and supplies the rest (its ``Objective``, its settings of
the kind's config); ``experiments.run.build_arm`` puts them together. A new kind is one module here
and one entry below.
"""

from __future__ import annotations

from dataclasses import dataclass

from rsm_core.arms.fo_trajectory import FOTrajectoryArm, FOTrajectoryConfig
from rsm_core.arms.zo_branch import ZOBranchArm, ZOBranchConfig
from rsm_core.arms.zo_trajectory import ZOTrajectoryArm, ZOTrajectoryConfig


@dataclass(frozen=True)
class ArmKind:
    name: str
    arm: type  # built as arm(backbone, reward, objective, train, test, config, seed=, rank=, world=, ...)
    config: type  # the kind's structured config (a frozen dataclass)


KINDS = {
    kind.name: kind
    for kind in (
        ArmKind("zo_branch", ZOBranchArm, ZOBranchConfig),
        ArmKind("fo_trajectory", FOTrajectoryArm, FOTrajectoryConfig),
        ArmKind("zo_trajectory", ZOTrajectoryArm, ZOTrajectoryConfig),
    )
}


def kind(name: str) -> ArmKind:
    if name not in KINDS:
        raise KeyError(f"no arm kind {name!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[name]
