"""The branching rollout, branching profiles and group advantages of the zeroth-order flow arm."""

from __future__ import annotations

import pytest
import torch

from rsm_core import estimators, profiles
from rsm_core.backbones.text import TinyTextEncoder
from rsm_core.backbones.tiny import TinyFlow
from rsm_core.rollout import branching_rollout
from rsm_core.world import prompts

# NFE per parent of the published sampler (which recomputes the trunk output per child), spec §6
SPEC_NFE = {"base": 333, "base2": 366, "highsnr": 278, "highsnr2": 324, "lowsnr": 388, "lowsnr2": 257}
SPEC_ROWS = {"base": 54, "base2": 54, "highsnr": 54, "highsnr2": 54, "lowsnr": 54, "lowsnr2": 30}


@pytest.mark.parametrize("name", list(SPEC_NFE))
def test_published_profiles_match_the_spec_table(name: str) -> None:
    profile = profiles.named(name)
    assert profile.total == SPEC_ROWS[name]
    assert profile.published_nfe_per_parent(10) == SPEC_NFE[name]
    assert profile.nfe_per_parent(10) == SPEC_NFE[name] - profile.total  # one trunk call saved per child
    weights = [profile.branch_weight(i) * k for i, k in enumerate(profile.k) if k]
    assert weights == pytest.approx([profile.k_avg] * len(profile.active))  # equal loss mass per step


def test_equal_variance_allocation() -> None:
    step_std = [0.7, 0.743, 0.5362, 0.4459, 0.3918, 0.3528, 0.3191, 0.282, 0.2254]
    flat = profiles.equal_variance(step_std, [1.0] * 9, 54)
    assert flat.total == 54 and all(k >= 1 for k in flat.k)
    assert flat.k[-1] > flat.k[0]  # a flat reward spread puts more children on high-SNR steps
    exact = [54 / s / sum(1 / v for v in step_std) for s in step_std]
    assert max(abs(k - e) for k, e in zip(flat.k, exact, strict=True)) < 1.0
    off = profiles.equal_variance(step_std, [1.0] * 8 + [0.0], 54)
    assert off.k[-1] == 0 and off.total == 54
    with pytest.raises(ValueError, match="cannot give each"):
        profiles.proportional([1.0] * 9, 5, "x")
    with pytest.raises(ValueError, match="unknown branching profile"):
        profiles.named("bogus")


def test_group_advantages_are_normalised_within_groups() -> None:
    reward = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 0.0, 4.0])
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    adv = estimators.advantages(reward, group, center="mean", scale="std", eps=1e-4)
    first = (reward[:3].double() - 2.0) / (reward[:3].double().std(unbiased=False) + 1e-4)
    assert adv.dtype == torch.float64 and torch.allclose(adv[:3], first)
    assert torch.equal(adv[3:5], torch.zeros(2, dtype=torch.float64))  # equal rewards: masked later
    assert torch.allclose(adv[5:], torch.tensor([-1.0, 1.0], dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("children", [8, 10])
@pytest.mark.parametrize("score", [1 / 3, 2 / 3, 3 / 5])
def test_a_group_of_equal_partial_scores_gets_advantage_exactly_zero(children: int, score: float) -> None:
    """The published tracker works in float64 and masks all-equal groups; float32 rounding would
    leave 1e-4 to 5e-3 on such a group (partial GenEval scores), keeping rows that must be masked."""
    reward = torch.cat([torch.full((children,), score), torch.linspace(0, 1, children)]).float()
    group = torch.arange(2).repeat_interleave(children)
    adv = estimators.advantages(reward, group, center="mean", scale="std", eps=1e-4)
    assert torch.equal(adv[:children], torch.zeros(children, dtype=torch.float64))
    assert bool((adv[children:] != 0).all())
    flat = reward[:children]  # what float32 arithmetic alone gives: not zero, so the rows would stay
    float32 = (flat - flat.sum() / children) / ((flat - flat.sum() / children).pow(2).mean().sqrt() + 1e-4)
    assert float(float32.abs().max()) > 1e-5
    stats = estimators.group_stats(reward, group)
    assert stats.constant.tolist() == [True, False]


@pytest.fixture(scope="module")
def flow() -> TinyFlow:
    torch.manual_seed(0)
    return TinyFlow(TinyTextEncoder(prompts.vocabulary()))


def test_branching_rollout_shares_the_trunk_and_counts_every_call(flow: TinyFlow) -> None:
    profile = profiles.named("highsnr2")
    ode, sde = flow.flow.ode_grid(10), flow.flow.sde_grid(10)
    times = flow.grid_times(10)
    cond = flow.encode(["a red circle", "two squares"])
    calls = []

    def guided(x, step, parents):
        calls.append(x.shape[0])
        return flow.native(x, times[step], cond[parents], cfg=4.5)

    start = torch.randn(2, *flow.latent_shape, generator=torch.Generator().manual_seed(0))
    out = branching_rollout(guided, ode, sde, start, profile.k, torch.Generator().manual_seed(1), chunk=16)
    assert out.nfe == sum(calls) == 2 * profile.nfe_per_parent(10)
    assert out.parent.numel() == 2 * profile.total
    for i, k in enumerate(profile.k):
        assert int((out.step == i).sum()) == 2 * k
    # one child, recomputed by hand: its SDE step from the trunk with its stored noise, then the ODE
    row = int(torch.nonzero(out.step == 3)[0])
    p = int(out.parent[row])
    with torch.no_grad():
        x = out.trunk[p : p + 1, 3]
        f = flow.native(x, times[3], cond[torch.tensor([p])], cfg=4.5)
        x = sde[3].sample(x.double(), f.double(), out.noise[row : row + 1].double()).float()
        for j in range(4, 10):
            f = flow.native(x, times[j], cond[torch.tensor([p])], cfg=4.5)
            x = ode[j].mean(x.double(), f.double()).float()
    assert torch.allclose(x, out.final[row : row + 1], atol=1e-5)
    # the trunk is the ODE path of the start noise
    assert torch.equal(out.trunk[:, 0], start)


@pytest.mark.slow  # make test stays under 10 minutes (measured 11:08 with it)
def test_auto_equal_variance_reallocates_from_measured_spread(tmp_path) -> None:
    """The auto profile starts from base, then sets k_i from the measured per-step reward spread,
    keeping sum k = 54 and every step on."""
    from experiments.run import run as train
    from experiments.sweep import SweepConfig, arm_config
    from rsm_core.config import load_config
    from rsm_core.records import read_metrics

    smoke = load_config(SweepConfig, "experiments/configs/fig3/smoke.yaml")
    overrides = ["method=uniform-reallocation", "arm.profile=auto-equal-variance"]
    run = train(arm_config(smoke, overrides, seed=0), tmp_path, "auto", progress=False)
    rows = read_metrics(run)
    profiles_used = [tuple(int(row[f"k_{i}"]) for i in range(9)) for row in rows[1:]]
    assert profiles_used[0] == profiles.named("base").k  # epoch 1 collects with the starting profile
    assert profiles_used[1] != profiles.named("base").k
    assert all(sum(k) == 54 and min(k) >= 1 for k in profiles_used)


def test_the_reference_output_is_computed_once_per_epoch_and_is_the_frozen_model(tmp_path) -> None:
    from experiments.run import RunConfig, build_arm
    from rsm_core.budget import Budget
    from rsm_core.config import load_config

    config = load_config(RunConfig, "experiments/configs/run/zo_branch/smoke.yaml")
    arm = build_arm(config)
    batch = arm.collect(Budget())
    plan = arm.microbatches(batch, 2)
    calls = []
    native = arm.backbone.native

    def counting(x, t, cond, **kwargs):
        if kwargs.get("adapter", "policy") is None:
            calls.append(x.shape[0])
        return native(x, t, cond, **kwargs)

    arm.backbone.native = counting
    for microbatch in plan:
        arm.loss(microbatch)
    pairs = torch.unique(batch.parent * 10 + batch.step).numel()
    assert sum(calls) == pairs  # every distinct trunk state once, however many microbatches use it
    filled = batch.has_reference.nonzero()
    p, s = filled[:, 0], filled[:, 1]
    with torch.no_grad():
        direct = native(batch.trunk[p, s], arm.times[s], arm.backbone.encode([batch.prompts[i] for i in p]),
                        cfg=arm.config.cfg, adapter=None)  # fmt: skip
    torch.testing.assert_close(batch.reference[p, s], direct)


def smoke_arm(*overrides: str):
    from experiments.run import RunConfig, build_arm
    from rsm_core.config import load_config

    smoke = "experiments/configs/run/zo_branch/smoke.yaml"
    return build_arm(load_config(RunConfig, smoke, overrides=list(overrides)))


def test_evaluation_split_over_processes_gives_the_whole_sets_values() -> None:
    """Each process evaluates a contiguous part of the test set with the whole set's noise, so the
    parts, concatenated, are the single process's values, whatever the split and the batch size."""
    arm = smoke_arm("arm.eval_batch=3", "arm.eval_images_per_prompt=2", "prompts.eval_prompts=4")
    with torch.no_grad():
        whole = arm.evaluate(0, 1)
        parts = [arm.evaluate(p, 3) for p in range(3)]  # 8 images: 2 + 3 + 3
    assert [len(p["reward"]) for p in parts] == [2, 3, 3]
    assert set(whole) == {"reward", "kl"} and len(whole["reward"]) == 8
    for name in whole:
        torch.testing.assert_close(torch.cat([p[name] for p in parts]), whole[name], rtol=1e-5, atol=1e-6)
    assert whole["reward"].std() > 0  # different images, not one repeated


def test_decoding_in_chunks_scores_like_decoding_at_once() -> None:
    from rsm_core.scoring import decode_and_score

    arm = smoke_arm()
    latents = torch.randn(5, *arm.backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    prompts = [m["prompt"] for m in arm.eval_prompts[:5]]
    metas = arm.eval_prompts[:5]
    calls = []

    def reward(images, prompts, metas):
        calls.append(len(images))
        return arm.reward(images, prompts, metas)

    chunked = decode_and_score(arm.backbone, {"r": reward}, latents, prompts, metas, chunk=2)["r"]
    assert calls == [2, 2, 1]
    at_once = decode_and_score(arm.backbone, {"r": reward}, latents, prompts, metas, chunk=12)["r"]
    torch.testing.assert_close(chunked, at_once, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # make test stays under 10 minutes (measured 11:08 with it)
def test_reward_workers_score_while_the_next_sampling_call_runs() -> None:
    """With reward_workers > 0 a call's children are scored in worker threads while the next call
    samples (published: 8 workers), and the epoch's rows are exactly the in-line ones."""
    import threading

    from rsm_core.budget import Budget

    def rows(workers: int, overlap_log: list | None = None):
        arm = smoke_arm(  # two sampling calls of one parent each, 30 children per parent
            f"arm.reward_workers={workers}",
            *("arm.prompts_per_epoch=2", "arm.seeds_per_prompt=1", "arm.collection_batch=1"),
            *("arm.profile=lowsnr2", "arm.decode_chunk=10"),
        )
        if overlap_log is not None:
            block_until_next_call(arm, overlap_log)
        return arm.collect(Budget())

    def block_until_next_call(arm, log: list) -> None:
        """Each scoring of a call's children waits (up to 10 s) until the next call has encoded its
        prompts; it logs its thread and whether that happened. In line, it could never happen."""
        config = arm.config
        calls = config.prompts_per_epoch * config.seeds_per_prompt // config.collection_batch
        started = [threading.Event() for _ in range(calls + 1)]
        encode, score = arm.backbone.encode, arm.reward

        def encode_and_count(prompts):
            if any(prompts):  # a call's prompts, not CFG's empty ones
                started[sum(e.is_set() for e in started)].set()
            return encode(prompts)

        def blocked_score(images, prompts, metas):
            call = sum(e.is_set() for e in started)  # the submitting call is the latest one started
            overlapped = call == calls or started[call].wait(10)
            log.append((threading.current_thread().name, overlapped))
            return score(images, prompts, metas)

        arm.backbone.encode, arm.reward = encode_and_count, blocked_score

    log: list = []
    inline, threaded = rows(0), rows(8, log)
    for name in ("reward", "advantage", "parent", "step", "noise", "trunk"):
        assert torch.equal(getattr(inline, name), getattr(threaded, name)), name
    assert len(log) >= 2
    assert all(thread.startswith("reward") and overlapped for thread, overlapped in log), log


def test_the_published_trunk_rounding_touches_pass_1_only(flow: TinyFlow) -> None:
    """trunk_native / trunk_dtype (the published fp16 rollout): x_0 and the state pass 1 carries are
    in the half dtype, the stored x_i are the float32 step outputs, pass 2b is left alone."""
    ode, sde = flow.flow.ode_grid(10), flow.flow.sde_grid(10)
    start = torch.randn(3, *flow.latent_shape, generator=torch.Generator().manual_seed(0))
    calls: list[tuple[str, int]] = []

    def native(x, step, parents, label="continuation"):
        calls.append((label, step))
        return torch.sin(3 * x) + 0.1 * step

    def rounded(x, step, parents):
        return native(x, step, parents, "trunk").half().float()

    def rollout(**kw):
        return branching_rollout(native, ode, sde, start, [2, 1, 0], torch.Generator().manual_seed(1), **kw)

    plain, half = rollout(), rollout(trunk_native=rounded, trunk_dtype=torch.float16)
    assert torch.equal(half.trunk[:, 0], start.half().float())
    assert torch.equal(half.trunk_native, half.trunk_native.half().float())
    x1 = ode[0].mean(start.half().double(), half.trunk_native[:, 0].double()).float()
    assert torch.equal(half.trunk[:, 1], x1)  # stored: the float32 output of the carried half state
    assert not torch.equal(half.trunk[:, 1], x1.half().float())
    assert {step for label, step in calls if label == "trunk"} == {0, 1, 2}
    assert not torch.equal(plain.final, half.final)
    torch.testing.assert_close(plain.final, half.final, rtol=0, atol=5e-2)  # a rounding, not a change
