"""The zeroth-order diffusion arms (zo_diffusion_pcpo spec §2-§5, §8): PCPO's trajectory arm and the
sparse-branching redesign on the branching arm.

Each claim is checked against a reference written here (torch's DistributedSampler, the spec's
schedule and counts, the loss and KL proxy spelled out) on a random-initialised tiny eps-model with a
black-box reward, so the whole file runs in seconds on one core.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DistributedSampler

from baselines import registry
from rsm_core import flows, grids, profiles
from rsm_core.arms import layout
from rsm_core.arms.zo_branch import EpochRows, ZOBranchArm, ZOBranchConfig
from rsm_core.arms.zo_trajectory import ZOTrajectoryArm, ZOTrajectoryConfig
from rsm_core.backbones.base import FlowSpec
from rsm_core.backbones.text import TinyTextEncoder
from rsm_core.backbones.tiny import TinyDiffusion, TinyDiffusionConfig
from rsm_core.budget import Budget
from rsm_core.transitions import Transitions
from rsm_core.world import prompts

ROOT = Path(__file__).resolve().parents[1]
W = 4.5  # PCPO's const_weight (spec §2)
S = 8.70575076181  # PCPO's weight_scale_factor (spec §2)
CLIP = 1e-4  # train_clip_range (spec §3.3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class MeanPixel:
    """A cheap black-box reward (the tiny world's stand-in for HPSv2.1): the mean pixel of each image."""

    name = "mean_pixel"
    differentiable = False

    def __call__(self, images, prompts, meta=None):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def backbone() -> TinyDiffusion:
    torch.manual_seed(0)
    config = TinyDiffusionConfig(resolution=8, block_out_channels=(8, 16), head_dim=4)
    model = TinyDiffusion(TinyTextEncoder(prompts.vocabulary()), config)
    model.add_lora(4, 4.0)
    return model


@pytest.fixture(scope="module")
def prompt_sets() -> tuple[list[dict], list[dict]]:
    return prompts.split()


@contextlib.contextmanager
def perturbed(backbone: TinyDiffusion, scale: float = 0.3):
    """The policy's LoRA moved off the reference, so that KLs are non-zero; restored afterwards so the
    module's other tests see the policy that collected their rows."""
    params = backbone.adapter_parameters()
    saved = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=generator))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)


def approx_kl_by_hand(f: torch.Tensor, f_ref: torch.Tensor) -> torch.Tensor:
    """PCPO's logged approx_kl per row: 1/2 mean_dims (4.5 (eps - eps_ref))^2 (spec §3.3, §4.3)."""
    return 0.5 * ((W * (f.double() - f_ref.double())) ** 2).flatten(1).mean(1)


# --- layout: the SD1.5 trainers' prompt sampler and shared initial noise (spec §3.1, §4.1) ------------


@pytest.mark.parametrize(
    ("n", "world", "seed", "epoch", "count"),
    [(10, 1, 42, 0, 4), (12, 4, 42, 3, 3), (37, 4, 42, 1, 9), (5, 4, 0, 7, 2), (3, 8, 42, 2, 1)],
)
def test_epoch_prompts_is_torchs_distributed_sampler(n: int, world: int, seed: int, epoch: int, count: int):
    """The published trainers' DistributedSampler(shuffle, seed) with set_epoch(epoch): the first
    ``count`` of each shard, each repeated; padding wraps around as torch's does (the last two cases)."""
    file = [{"prompt": f"prompt {i}", "i": i} for i in range(n)]
    firsts = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        first = list(sampler)[:count]
        got = layout.epoch_prompts(file, seed, epoch, rank, world, count, 3)
        assert [m["i"] for m in got] == [i for i in first for _ in range(3)]
        firsts += first
    if count * world <= n:  # no padding reached: the shards' prompts are disjoint
        assert len(set(firsts)) == count * world


def test_epoch_prompts_refuses_a_file_too_small_for_the_shards() -> None:
    file = [{"prompt": f"prompt {i}"} for i in range(5)]
    message = "needs 3 prompts per epoch but the 5 training prompts give each of 4 shards 2"
    with pytest.raises(ValueError, match=message):
        layout.epoch_prompts(file, 42, 0, 0, 4, 3, 1)


@pytest.mark.parametrize("calls", [1, 2, 5])
def test_shared_initial_noise_is_two_latents_over_whole_batches(calls: int) -> None:
    """The first calls // 2 batches start from draw A, the rest from draw B (5 calls: A A B B B)."""
    shape = (3, 4, 4)
    starts = layout.shared_initial_noise(calls, 3, shape, torch.Generator().manual_seed(0))
    reference = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1, *shape, generator=reference) for _ in range(2))
    assert not torch.equal(a, b)
    expected = [(a if call < calls // 2 else b).expand(3, *shape) for call in range(calls)]
    assert len(starts) == calls
    assert all(torch.equal(start, want) for start, want in zip(starts, expected, strict=True))
    starts[0].add_(1.0)  # each batch owns its storage: a rollout may write into its start
    assert all(torch.equal(start, want) for start, want in zip(starts[1:], expected[1:], strict=True))


# --- the published counts, no model run (spec §4.1, §4.3) ---------------------------------------------


def test_sparse_branching_counts_at_the_published_settings(backbone, prompt_sets) -> None:
    """K = 4 at steps 0, 10, ..., 40 of 49; 40 roots per rank give 800 children and 1,760 anchor pairs,
    of which min(1760, 0.1 x 800) = 80 are kept; tensor_split over the 200 microbatches puts them all
    into the first 80, i.e. the first of the two updates."""
    profile = profiles.strided(49, 10, 4)
    assert len(profile.k) == 49
    assert [(i, k) for i, k in enumerate(profile.k) if k] == [(0, 4), (10, 4), (20, 4), (30, 4), (40, 4)]
    assert profile.nfe_per_parent(50) == 49 + 4 * (49 + 39 + 29 + 19 + 9) == 629
    method = registry.get("sparse-branching")
    config = ZOBranchConfig(**method.arm_config)
    assert config.initial_profile() == profile
    train, test = prompt_sets
    arm = ZOBranchArm(backbone, MeanPixel(), method.objective(), train, test, config, seed=0, rank=0, world=4)
    roots = config.prompts_per_epoch // 4 * config.seeds_per_prompt
    assert roots == 40
    # the continuations' NFE of spec §4.1: sum over branching steps of 160 (49 - i) = 23,200
    assert roots * (profile.nfe_per_parent(50) - len(profile.k)) == 23_200
    children = torch.tensor([0, 10, 20, 30, 40]).repeat_interleave(4)
    rows = EpochRows(
        prompts=[f"prompt {p // 5}" for p in range(roots)],
        metas=[{"prompt": f"prompt {p // 5}"} for p in range(roots)],
        trunk=torch.zeros(roots, 50, 1),
        trunk_native=torch.zeros(roots, 49, 1),
        parent=torch.arange(roots).repeat_interleave(20),
        step=children.repeat(roots),
        noise=torch.zeros(800, 1),
        reward=torch.zeros(800),
        advantage=torch.ones(800),
        group=torch.zeros(800, dtype=torch.long),
        branch_weight=torch.ones(800),
        profile=profile,
    )
    plan = arm.microbatches(rows, 2)
    assert len(plan) == 800 // 4 == 200
    index = torch.cat([mb.index for mb in plan])
    assert sorted(index.tolist()) == list(range(800)) and all(bool(mb.valid.all()) for mb in plan)
    off = plan[0].off_steps.tolist()
    assert off == [i for i in range(49) if i % 10] and roots * len(off) == 1760
    anchors = torch.cat([mb.anchors for mb in plan])
    assert anchors.numel() == min(1760, int(0.1 * 800)) == 80
    assert anchors.unique().numel() == 80 and int(anchors.min()) >= 0 and int(anchors.max()) < 1760
    assert [mb.anchors.numel() for mb in plan] == [1] * 80 + [0] * 120


# --- the uw-sigma grid and S (spec §2, §8) -------------------------------------------------------------


def sd15_pairs(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(abar_t, abar_t') of SD1.5's leading grid written out from spec §1: scaled-linear betas
    0.00085 -> 0.012, t_i = (N - 1 - i) stride + 1, t' = t - stride, abar_0 below 0."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    stride = 1000 // steps
    t = torch.tensor([(steps - 1 - i) * stride + 1 for i in range(steps)])
    prev = t - stride
    return abar[t], torch.where(prev >= 0, abar[prev.clamp(min=0)], abar[0])


def undefined_steps(steps: int) -> list[int]:
    """Steps where the uw-sigma quadratic has no real root: (1 - abar')(W^2 + 1) < c1^2."""
    abar, abar_prev = sd15_pairs(steps)
    c1 = (1 - abar).sqrt() / (abar / abar_prev).sqrt()
    return torch.nonzero((1 - abar_prev) * (W**2 + 1) < c1**2).flatten().tolist()


@pytest.mark.parametrize("steps", [20, 27])
def test_uw_sigma_refuses_a_grid_without_a_real_root_naming_the_steps(backbone, steps: int) -> None:
    bad = undefined_steps(steps)
    assert bad  # the reference agrees the grid is too coarse
    named = re.escape(f"steps {bad} of this {steps}-step grid")
    with pytest.raises(ValueError, match=named):
        backbone.flow.sde_grid(steps, uw_sigma=W)  # the tiny model's float32 table, as the arms build it
    with pytest.raises(ValueError, match=named):
        grids.vp_pcpo(flows.vp_alphas_cumprod(), flows.ddim_timesteps(steps), W)


def test_uw_sigma_std_is_the_spec_formula_from_28_steps() -> None:
    """sigma' = [W c1 + sqrt(beta'(W^2 + 1) - c1^2)] / (W^2 + 1) on every grid of 28 ... 50 steps; its
    root makes (c1 + c2)/sigma' = W at every step (spec §2), except where W sqrt(.) < c1: then
    c2 = c1 - W sigma' and (c1 - c2)/sigma' = W instead (only step 26 of 28, next to the undefined
    region). Two printed values at 50 steps."""
    flow = FlowSpec("vp-eps", alphas_cumprod=flows.vp_alphas_cumprod())
    for steps in range(28, 51):
        assert undefined_steps(steps) == []
        nu = flow.sde_grid(steps, uw_sigma=W).kernel.nu
        abar, abar_prev = sd15_pairs(steps)
        c1 = (1 - abar).sqrt() / (abar / abar_prev).sqrt()
        sigma = (W * c1 + ((1 - abar_prev) * (W**2 + 1) - c1**2).sqrt()) / (W**2 + 1)
        torch.testing.assert_close(nu, sigma, rtol=1e-12, atol=0)
        c2 = (1 - abar_prev - nu**2).sqrt()
        crossed = [26] if steps == 28 else []
        ratio = torch.where(W * nu >= c1, c1 + c2, c1 - c2) / nu
        assert torch.nonzero(W * nu < c1).flatten().tolist() == crossed, steps
        torch.testing.assert_close(ratio, torch.full_like(nu, W), rtol=1e-12, atol=0)
    nu = flow.sde_grid(50, uw_sigma=W).kernel.nu
    assert float(nu[0]) == pytest.approx(0.446712, abs=5e-7)  # t = 981
    assert float(nu[-1]) == pytest.approx(0.014764, abs=5e-7)  # t = 1


def ddpm_weight_scale(steps: int) -> float:
    """S = W / mean_t w_t of the DDPM grid (spec §2, §8), w_t = (c1 - c2)/sigma_t, written out."""
    abar, abar_prev = sd15_pairs(steps)
    c1 = (1 - abar).sqrt() / (abar / abar_prev).sqrt()
    sigma = ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    c2 = (1 - abar_prev - sigma**2).sqrt()
    return W / float(((c1 - c2) / sigma).mean())


def test_pcpo_weight_scale_is_the_published_s_and_the_tiny_configs_recompute_it() -> None:
    """The published S agrees with W / mean w^DDPM to about six significant digits (relative 1e-6;
    float64 gives 8.705743, spec §2); the tiny world's 30-step configs use the 30-step value (§8)."""
    assert grids.pcpo_weight_scale(50) == pytest.approx(S, rel=1e-6)
    assert grids.pcpo_weight_scale(50) == pytest.approx(ddpm_weight_scale(50), rel=1e-12)
    assert grids.pcpo_weight_scale(30) == pytest.approx(ddpm_weight_scale(30), rel=1e-12)
    for scale in ("smoke", "tiny"):
        text = (ROOT / "experiments/configs/fig_zo_diffusion" / f"{scale}.yaml").read_text()
        factor = yaml.safe_load(text)["run"]["objective"]["weight_scale_factor"]
        assert factor == pytest.approx(grids.pcpo_weight_scale(30), rel=1e-12), scale


# --- the trajectory arm: PCPO (spec §3) ----------------------------------------------------------------

TRAJECTORY = dict(
    sampler_steps=30,
    trained_steps=29,
    prompts_per_epoch=1,
    generations_per_prompt=4,
    sample_batch=4,
    train_batch=2,
    eval_steps=30,
    eval_batch=2,
)


@pytest.fixture(scope="module")
def trajectory(backbone, prompt_sets) -> tuple[ZOTrajectoryArm, object, Budget]:
    """PCPO's arm shrunk: one prompt, 4 trajectories of 30 uw-sigma steps, 29 trained; one epoch."""
    train, test = prompt_sets
    objective = registry.get("pcpo-reweight").objective()
    arm = ZOTrajectoryArm(
        backbone, MeanPixel(), objective, train, test[:3], ZOTrajectoryConfig(**TRAJECTORY), seed=0
    )
    budget = Budget()
    return arm, arm.collect(budget), budget


def test_trajectory_arm_collects_whole_sde_walks_from_one_shared_start(trajectory) -> None:
    arm, batch, budget = trajectory
    shape = arm.backbone.latent_shape
    assert batch.states.shape == (4, 31, *shape)
    assert batch.native.shape == batch.noise.shape == (4, 30, *shape)
    assert batch.prompts == [batch.prompts[0]] * 4
    for j in range(1, 4):  # shared_halves with one sampling call: every trajectory starts from B
        assert torch.equal(batch.states[j, 0], batch.states[0, 0])
    finals = batch.states[:, -1].flatten(1)
    assert float(torch.pdist(finals).min()) > 1e-3  # the per-step SDE draws make them differ
    assert budget.nfe == 4 * 30 and budget.reward_calls == 4
    scored = MeanPixel()(arm.backbone.decode(batch.states[:, -1]), batch.prompts)  # the final image's
    torch.testing.assert_close(batch.reward.double(), scored.double())
    r = batch.reward.double()
    expected = (r - r.mean()) / (r.std(unbiased=False) + 1e-8)  # spec §3.2: +1e-8, population std
    torch.testing.assert_close(batch.advantage.double(), expected, rtol=1e-12, atol=0)


def test_trajectory_noise_is_the_draw_that_made_the_next_state(trajectory) -> None:
    arm, batch, _ = trajectory
    steps = torch.arange(30).repeat(4)

    def next_states(noise: torch.Tensor) -> torch.Tensor:
        rows = Transitions(
            kernel=arm.grid.kernel.select(steps),
            x=batch.states[:, :-1].flatten(0, 1).double(),
            f_old=batch.native.flatten(0, 1).double(),
            noise=noise.flatten(0, 1).double(),
        )
        return rows.x_next.float().unflatten(0, (4, 30))

    torch.testing.assert_close(next_states(batch.noise), batch.states[:, 1:], rtol=0, atol=1e-6)
    shifted = torch.roll(batch.noise, 1, dims=1)  # the neighbouring step's draw does not make it
    assert not torch.allclose(next_states(shifted), batch.states[:, 1:], atol=1e-3)


def test_trajectory_microbatches_follow_the_published_order(trajectory) -> None:
    """2 chunks of train_batch trajectories x 29 permutation positions; each trajectory walks its own
    permutation of the trained steps 0..28, so the first update (29 microbatches) trains exactly two
    whole trajectories."""
    arm, batch, _ = trajectory
    plan = arm.microbatches(batch, 2)
    assert len(plan) == 2 * 29
    members, permutations = [], []
    for chunk in (plan[:29], plan[29:]):
        chunk_members = chunk[0].trajectory.tolist()
        assert len(set(chunk_members)) == 2
        assert all(mb.trajectory.tolist() == chunk_members for mb in chunk)
        for column in torch.stack([mb.step for mb in chunk]).T:
            assert sorted(column.tolist()) == list(range(29))
            permutations.append(tuple(column.tolist()))
        members += chunk_members
    assert sorted(members) == [0, 1, 2, 3]
    assert len(set(permutations)) > 1  # its own permutation per trajectory
    first_update = {(int(t), int(s)) for mb in plan[:29] for t, s in torch.stack([mb.trajectory, mb.step], 1)}
    assert first_update == {(t, s) for t in plan[0].trajectory.tolist() for s in range(29)}
    with pytest.raises(ValueError, match="do not split into 4 updates"):
        arm.microbatches(batch, 4)


def test_trajectory_loss_is_pcpos_clipped_surrogate_on_the_stored_rows(trajectory) -> None:
    """At the sampling policy the surrogate is eps_c |A| per row; off it, the spec §3.3 loss
    max(0, eps_c |A| + A m) with m from the stored eps_old and z of each (trajectory, step), the
    clipfrac and approx_kl, all computed here."""
    arm, batch, _ = trajectory
    mb = arm.microbatches(batch, 2)[0]
    trajectory_, step = mb.trajectory, mb.step
    advantage = batch.advantage[trajectory_].double().clamp(-5, 5)
    loss, stats = arm.loss(mb)
    assert loss.ndim == 0 and bool(torch.isfinite(loss)) and loss.requires_grad
    assert {"clipfrac", "approx_kl"} <= set(stats)
    torch.testing.assert_close(loss.double(), (CLIP * advantage.abs()).mean())
    grads = torch.autograd.grad(loss, arm.backbone.adapter_parameters(), allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)

    with perturbed(arm.backbone):
        loss, stats = arm.loss(mb)
        x = batch.states[trajectory_, step]
        cond = arm.backbone.encode([batch.prompts[i] for i in trajectory_.tolist()])
        with torch.no_grad():
            f = arm.backbone.native(x, arm.times[step], cond, cfg=5.0)
            f_ref = arm.backbone.native(x, arm.times[step], cond, cfg=5.0, adapter=None)
    w_bar = W / S
    delta = w_bar * (f.double() - batch.native[trajectory_, step].double())
    z = batch.noise[trajectory_, step].double()
    m = 0.5 * (delta**2).flatten(1).mean(1) + (delta * z).flatten(1).mean(1)
    inner = CLIP * advantage.abs() + advantage * m
    torch.testing.assert_close(loss.double(), inner.clamp(min=0).mean(), rtol=1e-5, atol=1e-9)
    assert stats["clipfrac"] == pytest.approx(float((inner < 0).double().mean()))
    kl = approx_kl_by_hand(f, f_ref)
    assert float(kl.min()) > 0
    assert stats["approx_kl"] == pytest.approx(float(kl.mean()), rel=1e-5)


# --- the branching arm: the sparse-branching redesign (spec §4) ----------------------------------------


def sparse_arm(backbone, prompt_sets, **changes) -> ZOBranchArm:
    """The sparse-branching method's published arm settings, shrunk: 30 steps (K = 4 at steps 0, 10,
    20 of 29), one prompt with 3 roots in one call, microbatches of 4 rows; chunk sizes are memory only."""
    settings = dict(registry.get("sparse-branching").arm_config)
    settings |= dict(
        sampler_steps=30,
        eval_steps=30,
        prompts_per_epoch=1,
        seeds_per_prompt=3,
        collection_batch=3,
        microbatch_rows=4,
        chunk=36,
        decode_chunk=36,
        eval_batch=2,
    )
    train, test = prompt_sets
    method = registry.get("sparse-branching")
    config = ZOBranchConfig(**(settings | changes))
    return ZOBranchArm(backbone, MeanPixel(), method.objective(), train, test[:3], config, seed=0)


@pytest.fixture(scope="module")
def branch(backbone, prompt_sets) -> tuple[ZOBranchArm, EpochRows]:
    arm = sparse_arm(backbone, prompt_sets)
    return arm, arm.collect(Budget())


def z_scored(reward: torch.Tensor) -> torch.Tensor:
    r = reward.double()
    return (r - r.mean()) / (r.std(unbiased=False) + 1e-4)  # spec §4.2: +1e-4, population std


def test_sparse_children_and_their_prompt_groups(branch, backbone, prompt_sets) -> None:
    """36 children (3 roots x 4 at steps 0, 10, 20); group_by "prompt" pools a step's children over
    the prompt's roots (12 per group), group_by "parent" keeps one root's 4."""
    arm, rows = branch
    assert arm.profile.k == profiles.strided(29, 10, 4).k
    assert rows.parent.numel() == 36
    for parent in range(3):
        for step in range(29):
            count = int(((rows.parent == parent) & (rows.step == step)).sum())
            assert count == (4 if step in (0, 10, 20) else 0), (parent, step)
    # shared_halves with one call: the roots start from one latent, so their ODE trunks coincide (§4.1)
    assert torch.equal(rows.trunk[1], rows.trunk[0]) and torch.equal(rows.trunk[2], rows.trunk[0])
    groups = rows.group.unique()
    assert len(groups) == 3
    for group in groups:
        members = rows.group == group
        assert int(members.sum()) == 12 and rows.step[members].unique().numel() == 1
        assert rows.parent[members].unique().tolist() == [0, 1, 2]
        torch.testing.assert_close(rows.advantage[members].double(), z_scored(rows.reward[members]))

    by_parent = sparse_arm(backbone, prompt_sets, group_by="parent").collect(Budget())
    assert torch.equal(by_parent.reward, rows.reward)  # the same rollout, grouped differently
    groups = by_parent.group.unique()
    assert len(groups) == 9
    for group in groups:
        members = by_parent.group == group
        assert int(members.sum()) == 4
        assert by_parent.parent[members].unique().numel() == 1
        assert by_parent.step[members].unique().numel() == 1
        torch.testing.assert_close(by_parent.advantage[members].double(), z_scored(by_parent.reward[members]))


def test_sparse_anchors_are_few_early_and_weighted_by_beta_alone(branch) -> None:
    """int(0.1 x 36) = 3 anchor rows, all in the first half of the 10 microbatches (the first update);
    a microbatch with anchors adds beta mean(approx_kl) of its anchor rows, without the k_avg = 4
    weight (anchor_k_avg False), checked against the objective's KL and the literal formula."""
    arm, rows = branch
    plan = arm.microbatches(rows, 2)
    assert len(plan) == 10  # 36 rows / 4 = 9, rounded up to a multiple of 2 updates
    counts = [mb.anchors.numel() for mb in plan]
    assert sum(counts) == int(0.1 * 36) == 3 and sum(counts[5:]) == 0
    off = plan[0].off_steps
    assert off.tolist() == [i for i in range(29) if i % 10]
    anchors = torch.cat([mb.anchors for mb in plan])
    assert anchors.unique().numel() == 3 and int(anchors.max()) < 3 * len(off)

    mb = plan[counts.index(1)]
    parent, step = mb.anchors // len(off), off[mb.anchors % len(off)]
    with perturbed(arm.backbone):
        loss, stats = arm.loss(mb)
        x = rows.trunk[parent, step]
        cond = arm.backbone.encode([rows.prompts[p] for p in parent.tolist()])
        with torch.no_grad():
            f = arm.backbone.native(x, arm.times[step], cond, cfg=5.0)
            f_ref = arm.backbone.native(x, arm.times[step], cond, cfg=5.0, adapter=None)
    literal = approx_kl_by_hand(f, f_ref)
    anchor_rows = Transitions(kernel=arm.sde.kernel.select(step), x=x, f_old=f, f_ref=f_ref)
    torch.testing.assert_close(arm.objective.kl(f, anchor_rows).double(), literal, rtol=1e-5, atol=0)
    kl = float(literal.mean())
    assert kl > 0 and rows.profile.k_avg == 4
    assert stats["kl_anchor_loss"] == pytest.approx(kl, rel=1e-5)
    assert float(loss.detach()) - stats["policy_loss"] == pytest.approx(8e-5 * kl, rel=1e-4)


# --- evaluation (spec §5) ------------------------------------------------------------------------------


@pytest.mark.parametrize("arm_fixture", ["trajectory", "branch"])
def test_sde_evaluation_does_not_depend_on_the_split(arm_fixture: str, request) -> None:
    """The plain uw-sigma sampler with fixed noise per image: parts 1 + 2 of the 3 test images (in
    batches of 2) concatenate to the whole set's values, with the policy off the reference."""
    arm = request.getfixturevalue(arm_fixture)[0]
    with perturbed(arm.backbone):
        whole = arm.evaluate(0, 1)
        parts = [arm.evaluate(p, 2) for p in range(2)]
    assert set(whole) == {"reward", "kl", "approx_kl"}
    assert len(whole["reward"]) == 3 and [len(p["reward"]) for p in parts] == [1, 2]
    for name, values in whole.items():
        torch.testing.assert_close(torch.cat([p[name] for p in parts]), values, rtol=1e-5, atol=1e-7)
    assert bool((whole["kl"] > 0).all()) and bool((whole["approx_kl"] > 0).all())
    assert whole["reward"].unique().numel() == 3  # three images, not one repeated
    assert math.isfinite(float(whole["approx_kl"].sum()))


@pytest.mark.parametrize("kind", ["trajectory", "branch"])
def test_a_restored_arm_draws_the_same_next_epoch(kind: str, backbone, prompt_sets) -> None:
    """What a checkpoint keeps of an arm (its state, and the generator the trainer saves) is all the
    next epoch's prompts and noise depend on: the epoch sampler's count is part of the state."""
    train, test = prompt_sets

    def build():
        if kind == "branch":
            return sparse_arm(backbone, prompt_sets, seeds_per_prompt=1, collection_batch=1)
        objective = registry.get("pcpo-reweight").objective()
        config = ZOTrajectoryConfig(**(TRAJECTORY | {"generations_per_prompt": 2, "sample_batch": 2}))
        return ZOTrajectoryArm(backbone, MeanPixel(), objective, train, test[:3], config, seed=0)

    first = build()
    first.collect(Budget())
    state, rng = first.state(), first.generator.get_state()
    expected = first.collect(Budget())
    restored = build()
    restored.load_state(state, restored.state_tensors())
    restored.generator.set_state(rng)
    again = restored.collect(Budget())
    assert again.prompts == expected.prompts
    assert torch.equal(again.reward, expected.reward)
    fresh = build()  # without the state: epoch 0's prompts again, a different epoch
    assert fresh.collect(Budget()).prompts != expected.prompts or len(train) == 1
