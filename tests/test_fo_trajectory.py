"""The first-order arm: trajectories, the transitions it trains, and its reward-gradient estimators."""

from __future__ import annotations

import pytest
import torch

from rsm_core.arms.fo_trajectory import low_variance_steps
from rsm_core.budget import Budget

SMOKE = "experiments/configs/run/fo_trajectory/smoke.yaml"


def fo_arm(method: str, *overrides: str):
    from experiments.run import RunConfig, build_arm
    from rsm_core.config import load_config

    return build_arm(load_config(RunConfig, SMOKE, overrides=[f"method={method}", *overrides]))


def test_low_variance_subsampling_is_the_published_draw() -> None:
    """50 steps, fraction 0.2 (spec §A.2): step 49 first, then one step from each trunk of 5, the
    last trunk first; 11 rows, the last step possibly twice."""
    generator = torch.Generator().manual_seed(0)
    seen_twice = False
    for _ in range(200):
        steps = low_variance_steps(50, 0.2, generator).tolist()
        assert len(steps) == 11 and steps[0] == 49
        for j, step in enumerate(steps[1:]):
            trunk = 9 - j
            assert 5 * trunk <= step < 5 * trunk + 5
        seen_twice |= steps[1] == 49
    assert seen_twice


@pytest.fixture(scope="module")
def collected():
    arm = fo_arm("vgg-flow")
    budget = Budget()
    return arm, arm.collect(budget), budget


def test_collection_keeps_whole_ode_trajectories_of_the_policy(collected) -> None:
    arm, batch, budget = collected
    config = arm.config
    assert batch.states.shape[:2] == (config.trajectories_per_epoch, config.sampler_steps + 1)
    assert budget.nfe == config.trajectories_per_epoch * config.sampler_steps
    for i in range(config.sampler_steps):  # each state is the Euler step of the stored output
        step = arm.grid[i].mean(batch.states[:, i].double(), batch.native[:, i].double()).float()
        torch.testing.assert_close(batch.states[:, i + 1], step)
    assert batch.noise is None and batch.terminal_grad is None
    # every transition of every trajectory, each trajectory's rows together
    assert batch.step.tolist() == list(range(config.sampler_steps)) * config.trajectories_per_epoch


def test_tweedie_estimator_is_the_reward_gradient_at_the_detached_tweedie_point(collected) -> None:
    """Pruned VGG-Flow (spec §B.3): G = grad r(decode(x - sigma sg(v))) with identity Jacobian."""
    arm, batch, _ = collected
    index = torch.tensor([1, 4])
    trajectory, step = batch.trajectory[index], batch.step[index]
    x = batch.states[trajectory, step]
    prompts = [batch.prompts[i] for i in trajectory.tolist()]
    cond = arm.backbone.encode(prompts)
    f = arm.backbone.native(x, arm.times[step], cond, cfg=arm.config.cfg)
    grad = arm._signal(batch, index, x, f, cond)
    sigma = arm.grid.kernel.point.sigma[step].float().view(-1, 1, 1, 1)
    y = (x - sigma * f.detach()).requires_grad_(True)
    metas = [batch.metas[i] for i in trajectory.tolist()]
    (expected,) = torch.autograd.grad(arm.reward(arm.backbone.decode(y), prompts, metas).sum(), y)
    torch.testing.assert_close(grad, expected)
    assert float(grad.norm()) > 0


def test_terminal_estimator_is_computed_once_per_trajectory_at_its_final_latent() -> None:
    arm = fo_arm("reward-score-distillation-flow")
    batch = arm.collect(Budget())
    assert arm.reward_grad_calls == arm.config.trajectories_per_epoch
    final = batch.states[:, -1].clone().requires_grad_(True)
    score = arm.reward(arm.backbone.decode(final), batch.prompts, batch.metas)
    (expected,) = torch.autograd.grad(score.sum(), final)
    torch.testing.assert_close(batch.terminal_grad, expected)
    index = torch.arange(3)
    grad = arm._signal(batch, index, None, None, None)
    assert torch.equal(grad, batch.terminal_grad[batch.trajectory[index]])
    assert arm.reward_grad_calls == arm.config.trajectories_per_epoch  # rows reuse it


def test_an_update_gets_whole_trajectories_in_equal_microbatches(collected) -> None:
    arm, batch, _ = collected
    parts = arm.microbatches(batch, 2)
    size = arm.config.microbatch_rows
    assert all(len(part.index) == size for part in parts)
    half = len(parts) // 2
    first = {int(t) for part in parts[:half] for t in batch.trajectory[part.index]}
    second = {int(t) for part in parts[half:] for t in batch.trajectory[part.index]}
    assert first.isdisjoint(second) and len(first) == len(second) == 1
    with pytest.raises(ValueError, match="updates per epoch"):
        arm.microbatches(batch, 3)


def test_a_black_box_reward_is_refused() -> None:
    with pytest.raises(Exception, match="not differentiable"):
        fo_arm("vgg-flow", "reward=shapes_geneval")


def test_evaluation_split_over_processes_gives_the_whole_sets_values() -> None:
    arm = fo_arm("vgg-flow", "prompts.eval_prompts=3")
    with torch.no_grad():
        whole = arm.evaluate(0, 1)
        parts = [arm.evaluate(p, 2) for p in range(2)]
    assert set(whole) == {"reward", "drift"} and len(whole["reward"]) == 3
    for name in whole:
        # float32 batches of other sizes round differently; the noise and prompts are the same
        torch.testing.assert_close(torch.cat([p[name] for p in parts]), whole[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("identical", [True, False])
def test_rank_identical_seeding_reproduces_the_published_vgg_flow_ranks(identical: bool) -> None:
    """Spec §B.1, E.4: the published VGG-Flow ranks seed alike and sample the same trajectories; the
    switch off (the default) gives each shard its own prompts and noise."""
    from experiments.run import RunConfig, build_arm, build_parts, sections
    from rsm_core.config import load_config

    small = ["arm.sampler_steps=2", "arm.trajectories_per_epoch=1", "arm.collection_batch=1"]
    overrides = ["method=vgg-flow", f"arm.rank_identical_seeding={identical}", *small]
    config = sections(load_config(RunConfig, SMOKE, overrides=overrides))
    parts = build_parts(config.run)
    first, second = (build_arm(config, parts, rank=rank, world=2).collect(Budget()) for rank in range(2))
    same = first.prompts == second.prompts and torch.equal(first.states, second.states)
    assert same == identical
