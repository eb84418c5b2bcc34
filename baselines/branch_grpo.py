"""Branch-GRPO: recorded in the registry, not reduced (theory spec §5.3, Eq. 114).

Its RSM reading is the multi-particle lookahead estimator with K > 1 at branch nodes, each transition
using the fused reward of its subtree's leaves. The fusion rule, the depth-wise advantage
normalisation and the pruning schedule are not pinned down by the paper, the specs or the RSM code,
so no native loss can be written faithfully and no gradient identity can be checked.
"""

from __future__ import annotations

from baselines.method import Method, Relation, TableRow
from rsm_core import grids

METHOD = Method(
    name="branch-grpo",
    title="Branch-GRPO",
    grid=grids.sd35_flow_grpo,
    table=TableRow(
        estimator="ZO",
        lookahead="tree to $x_0$",
        branching="recursive $K$ at branch points",
        temporal_weight=r"$\mathbb{1}$",
        trust_region=r"clip on $\rho$",
        c1=r"$\alpha_t b^2/(2\nu^2 d)$",
        g=r"$\mathbb{1}\bar A b\,\epsilon/(2\nu d)$, $\bar A$ fused subtree advantage",
        p=r"$\mathbb{1}\bar A b^2/(2\nu^2 d)$",
    ),
    relation=Relation.NOT_REDUCED,
    note="not reduced: the reward fusion rule, depth-wise normalisation and pruning are not pinned down",
)
