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
    metas = [batch.metas[i] for i in trajectory.tolist()]
    grad = arm._signal(batch, index, x, f, cond, prompts, metas)
    sigma = arm.grid.kernel.point.sigma[step].float().view(-1, 1, 1, 1)
    y = (x - sigma * f.detach()).requires_grad_(True)
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
    grad = arm._signal(batch, index, None, None, None, None, None)
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


# --- the unpruned algorithms' auxiliary networks, and SQDF -------------------------------------


def _policy_output(arm) -> torch.Tensor:
    x = torch.randn(2, *arm.backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return arm.backbone.native(
            x,
            arm.times[[1, 3]],
            arm.backbone.encode(["a red circle", "two blue squares"]),
            cfg=arm.config.cfg,
        )


def test_the_value_network_is_a_second_adapter_with_a_near_zero_trainable_head() -> None:
    """Spec §B.5: own LoRA, the output layer trainable and x 1e-5 at init, its own group and clip;
    the policy is the pruned arm's, bit for bit."""
    arm = fo_arm("vgg-flow-unpruned")
    backbone = arm.backbone
    policy, value = arm.param_groups()
    assert (policy.name, value.name) == ("policy", "value")
    assert (value.max_grad_norm, value.ema) == (1.0, False) and value.lr is None  # the policy's AdamW
    assert not {id(p) for p in policy.params} & {id(p) for p in value.params}
    head = backbone.trainable_copy(backbone.output_layer, "value")
    base = backbone.model.get_submodule(backbone.output_layer).original_module
    torch.testing.assert_close(head.weight, 1e-5 * base.weight)
    torch.testing.assert_close(head.bias, base.bias)
    assert any(p is head.weight for p in value.params) and head.weight.requires_grad
    assert not base.weight.requires_grad
    torch.testing.assert_close(_policy_output(arm), _policy_output(fo_arm("vgg-flow")), rtol=0, atol=0)
    # near-zero output: g_psi hardly depends on its input where the reference does
    x1, x2 = torch.randn(2, 1, *backbone.latent_shape, generator=torch.Generator().manual_seed(1))
    cond, t = backbone.encode(["a red circle"]), arm.times[[2]]
    with torch.no_grad():
        moved = arm.aux(x1, t, cond) - arm.aux(x2, t, cond)
        reference = backbone.native(x1, t, cond, adapter=None) - backbone.native(x2, t, cond, adapter=None)
    assert float(moved.norm()) < 1e-3 * float(reference.norm())


def _one_update(arm):
    batch = arm.collect(Budget())
    microbatch = arm.microbatches(batch, 1)[0]
    loss, stats = arm.loss(microbatch)
    loss.backward()
    return batch, microbatch, stats


@pytest.mark.parametrize(
    ("method", "group", "terms"),
    [
        ("vgg-flow-unpruned", "value", ("loss_velocity", "loss_consistency", "loss_terminal")),
        ("residual-nabla-db-unpruned", "residual", ("loss_forward", "loss_backward", "loss_terminal")),
    ],
)
def test_an_unpruned_loss_trains_the_policy_and_its_auxiliary_network(method, group, terms) -> None:
    arm = fo_arm(method)
    _, _, stats = _one_update(arm)
    policy, aux = arm.param_groups()
    assert aux.name == group
    for params in (policy.params, aux.params):
        grads = [p.grad for p in params if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    for name in (*terms, "aux_norm", "aux_signal_norm"):
        assert name in stats and stats[name] == stats[name]  # logged and not nan


def test_the_residual_network_is_a_small_unet_with_a_zero_output_bias_and_its_own_optimiser() -> None:
    """Spec §A.6: g_phi in fp32, conv_out bias zeroed, lr 1e-3, decay 1e-2, clip 1; shards of one
    process share it."""
    from experiments.run import RunConfig, build_arm, build_parts, sections
    from rsm_core.config import load_config

    resolved = sections(load_config(RunConfig, SMOKE, overrides=["method=residual-nabla-db-unpruned"]))
    parts = build_parts(resolved.run)
    first, second = (build_arm(resolved, parts, rank=r, world=2) for r in range(2))
    assert first.aux is second.aux
    _, residual = first.param_groups()
    assert (residual.name, residual.lr, residual.weight_decay, residual.max_grad_norm) == (
        "residual",
        1e-3,
        1e-2,
        1.0,
    )
    net = first.aux.net
    assert torch.all(net.conv_out.bias == 0) and net.conv_out.weight.abs().sum() > 0
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert list(net.config.block_out_channels) == list(resolved.arm.aux_residual_channels)


@pytest.mark.parametrize(
    ("method", "override", "message"),
    [
        ("vgg-flow", "arm.auxiliary=value_adapter", "has no auxiliary network"),
        ("vgg-flow-unpruned", "arm.auxiliary=none", "trains an auxiliary network"),
        ("vgg-flow", "arm.estimator=none", "trains on its rows' reward gradient"),
        ("sqdf", "arm.estimator=tweedie", "reads no reward gradient"),
    ],
)
def test_a_method_and_its_arm_settings_must_agree(method, override, message) -> None:
    with pytest.raises(ValueError, match=message):
        fo_arm(method, override)


def test_sqdf_trains_one_uniform_step_per_trajectory_with_fresh_noise() -> None:
    """Spec §C.1: one uniform step k per trajectory, x' = mu_theta + nu z with a fresh z, and the
    reward of x' through the frozen reference's Tweedie estimate (no reward gradient in the rows)."""
    arm = fo_arm("sqdf")
    batch = arm.collect(Budget())
    assert batch.trajectory.tolist() == list(range(arm.config.trajectories_per_epoch))
    assert batch.noise is not None and batch.terminal_grad is None
    calls = arm.reward_grad_calls
    microbatch = arm.microbatches(batch, 1)[0]
    loss, stats = arm.loss(microbatch)
    assert "reward_grad_norm" not in stats
    assert arm.reward_grad_calls == calls + len(microbatch.index)  # one reward of x' per row
    loss.backward()
    grads = [p.grad for p in arm.param_groups()[0].params if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    stored = batch.noise[batch.trajectory[microbatch.index], batch.step[microbatch.index]]
    fresh = arm._row_noise(batch, batch.trajectory[microbatch.index], batch.step[microbatch.index])
    assert fresh.shape == stored.shape and not torch.equal(fresh, stored)


def test_sqdf_replay_keeps_the_newest_trajectories_and_resumes_exactly(tmp_path) -> None:
    """replay_capacity 3 with 2 fresh trajectories an epoch: after two epochs the buffer holds the
    newest 3 (one of the first epoch's, both of the second's); a run resumed from a checkpoint
    continues with the same buffer and ends with the same weights."""
    from rsm_core.trainer import LoopConfig, Trainer

    loop = LoopConfig(epochs=2, lr=1e-3, ema=False, updates_per_epoch=1, eval_every=1, checkpoint_every=1)

    def fresh() -> Trainer:
        return Trainer([fo_arm("sqdf", "arm.replay_capacity=3")], loop)

    straight = fresh()
    straight.train_epoch()
    first = straight.shards[0].collected
    straight.train_epoch()
    arm = straight.shards[0]
    buffer, second = arm.buffer, arm.collected
    assert len(buffer.prompts) == 3
    torch.testing.assert_close(buffer.states[:1], first.states[1:])
    torch.testing.assert_close(buffer.states[1:], second.states)

    interrupted = fresh()
    interrupted.train_epoch()
    interrupted.save(tmp_path / "checkpoint.safetensors")
    resumed = fresh()
    resumed.load(tmp_path / "checkpoint.safetensors")
    torch.testing.assert_close(resumed.shards[0].buffer.states, interrupted.shards[0].buffer.states)
    assert resumed.shards[0].buffer.prompts == interrupted.shards[0].buffer.prompts
    resumed.train_epoch()
    torch.testing.assert_close(resumed.shards[0].buffer.states, buffer.states, rtol=0, atol=0)
    for p, q in zip(straight.params, resumed.params, strict=True):
        assert torch.equal(p, q)


def test_a_replay_buffer_smaller_than_an_epoch_is_refused() -> None:
    with pytest.raises(Exception, match="replay_capacity"):
        fo_arm("sqdf", "arm.replay_capacity=1")


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
