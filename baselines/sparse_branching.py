"""The paper's redesign of zeroth-order diffusion: sparse branching (zo_diffusion_pcpo spec §4).

PCPO's loss (constant weight w_bar, clipped log-ratio surrogate, "bad" precision) on a different
estimator: a deterministic DDIM root per parent, K = 4 one-step uw-sigma children at every 10th
step, DDIM continuations to the reward, advantages per (prompt, step) over the 20 children of a
common ODE parent; rows weighted by K_bar / K; and an ODE-anchor term beta 1/2 mean_d (4.5 (eps -
eps_ref))^2 on at most 10 % as many non-branching root states as there are children. The branching
arm (rsm_core.arms.zo_branch) runs it with the settings below; the loss is PCPO's times K_bar / K.
Canonical (per child): PCPO-reweight's G and P times K_bar / K; the anchors add C1 on their rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from baselines import pcpo
from baselines.method import Family, Method, Relation, Signal
from rsm_core import grids
from rsm_core.flows import per_sample
from rsm_core.loss import Coefficients, Surrogate
from rsm_core.transitions import Transitions


@dataclass(frozen=True)
class SparseBranchingConfig(pcpo.PCPODiffusionConfig):
    beta: float = 8e-5  # ode_kl_anchor_beta (the published config comments out an alternative 0.01)


def loss(f_theta: Tensor, rows: Transitions, config: SparseBranchingConfig) -> Surrogate:
    rows.require("noise", "advantage", "branch_weight", method="sparse branching")
    policy = pcpo.reweight_loss(f_theta, rows, config)
    return Surrogate(rows.branch_weight * policy.loss, policy.active)


def coefficients(
    f_theta: Tensor, rows: Transitions, config: SparseBranchingConfig, active: Tensor
) -> Coefficients:
    base = pcpo.reweight_coefficients(f_theta, rows, config, active)
    weight = rows.branch_weight
    return Coefficients(base.c1 * weight, base.g * per_sample(weight, base.g), base.p * weight)


METHOD = Method(
    name="sparse-branching",
    title="Sparse branching (K = 4 every 10th step, ODE anchors)",
    grid=grids.sd15_pcpo,
    relation=Relation.EXACT,
    family=Family.REDESIGN,
    signal=Signal.STEIN,
    config=SparseBranchingConfig(),
    loss=loss,
    coefficients=coefficients,
    needs=("noise", "advantage", "branch_weight"),
    note="PCPO's loss on a sparse branching estimator; anchors beta = 8e-5 on <= 10 % of the child rows",
    arm="zo_branch",
    arm_config={  # the published train_grpo_pr.py settings (spec §4), per 4 GPUs
        "profile": "sparse",
        "sparse_k": 4,
        "sparse_stride": 10,
        "sampler_steps": 50,
        "sde_uw_sigma": 4.5,
        "cfg": 5.0,
        "prompts_per_epoch": 32,  # 8 per rank
        "seeds_per_prompt": 5,
        "collection_batch": 8,
        "prompt_sampler": "epoch",
        "initial_noise": "shared_halves",
        "group_by": "prompt",
        "microbatch_rows": 4,  # policy_update_row_batch_size
        "chunk": 2,  # latent_chunk_size of the continuations (memory only)
        "decode_chunk": 8,
        "adv_std_eps": 1e-4,
        "ode_anchors": True,
        "anchor_ratio": 0.1,
        "anchor_k_avg": False,
        "eval_sampler": "sde",
        "eval_steps": 50,
        "eval_batch": 8,
        "eval_seed": 42,
    },
    kl=pcpo.approx_kl,
    diagnostics=pcpo.diagnostics,
)
