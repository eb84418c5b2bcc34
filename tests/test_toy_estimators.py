"""Estimators on the toy in oracle mode (exact mixture scores): toy spec §8, theory §3."""

from __future__ import annotations

import pytest
import torch

from experiments.toy_study import StudySettings, ToyStudy, point_rmse
from rsm_core import estimators as est
from rsm_core.kernels import ddim
from rsm_core.rollout import Chain, rollout
from rsm_core.toy.mixture import (
    EVAL_TIMESTEP,
    UnitMixture,
    hard_value_gradient,
    reward,
    reward_gradient,
    soft_ground_truth,
    toy_alphas_cumprod,
)

ABAR = toy_alphas_cumprod()
REFERENCE = UnitMixture.reference()
TILTED = REFERENCE.tilted(reward_gradient())


def oracle(mixture: UnitMixture):
    return lambda x, t: mixture.eps(x, float(ABAR[t]))


def study(points: int, seed: int = 0) -> ToyStudy:
    settings = StudySettings(points=points, log2_samples=(4,), seed=seed, dtype=torch.float64)
    return ToyStudy(oracle(TILTED), oracle(REFERENCE), settings)


def points_with_large_soft_hard_gap(count: int) -> torch.Tensor:
    """Among 400 draws of x_t ~ p*_t, the ones where the soft and hard targets differ most."""
    candidates = study(400, seed=7).x_t
    a = float(ABAR[EVAL_TIMESTEP])
    gap = (soft_ground_truth(candidates, a) - hard_value_gradient(candidates, a)).norm(dim=1)
    return candidates[gap.argsort(descending=True)[:count]]


def zeroth_order_with_standard_error(x_t: torch.Tensor, width: int, soft: bool, seed: int = 0):
    s = study(1)
    particles = est.zeroth_order_particles(
        s.chain(),
        x_t,
        0,
        depth=None,
        width=width,
        reward=reward,
        generator=torch.Generator().manual_seed(seed),
        reference=(lambda x, i: oracle(REFERENCE)(x, s.timesteps[i])) if soft else None,
    )
    rewards = (
        est.entropy_augmented_return(particles.rewards, particles.path_kl, 1.0) if soft else particles.rewards
    )
    estimate = est.zeroth_order_estimate(rewards, particles.noise, particles.nu, particles.scale)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    terms = particles.scale / particles.nu * centred.unsqueeze(-1) * particles.noise
    return estimate, terms.std(dim=1) / width**0.5


def test_toy_kernel_coefficients_match_the_spec() -> None:
    """Toy spec §4-5: step 389 -> 379 has nu = 0.45627, b = 0.23465, omega* = 0.88720 (official: 0.98799)."""
    first = study(1).chain().kernels[0]
    assert first.nu.item() == pytest.approx(0.45627, abs=5e-6)
    assert first.b.item() == pytest.approx(0.23465, abs=5e-6)
    assert est.lookahead_scale(first).item() == pytest.approx(0.88720, abs=5e-6)
    one_index = ddim(float(ABAR[EVAL_TIMESTEP]), float(ABAR[EVAL_TIMESTEP - 1]))
    assert est.lookahead_scale(one_index).item() == pytest.approx(0.98799, abs=5e-6)
    assert len(study(1).chain()) == 39 and not study(1).chain().kernels[-1].stochastic


def test_current_state_tweedie_is_the_exact_hard_value_gradient() -> None:
    """§8.1: with exact scores and a linear reward, grad r(x0_hat(x_t)) = H(x_t) to round-off."""
    s = study(20)
    estimate = est.first_order_current(s.chain(), s.x_t, 0, reward)
    torch.testing.assert_close(estimate, s.hard_target, rtol=1e-10, atol=1e-12)


def test_full_rollout_zeroth_order_is_unbiased_for_the_hard_value_gradient() -> None:
    """Theorem 3.7: within 5 standard errors of H, and detectably not the soft ground truth."""
    x_t = points_with_large_soft_hard_gap(3)
    estimate, standard_error = zeroth_order_with_standard_error(x_t, 1 << 15, soft=False)
    a = float(ABAR[EVAL_TIMESTEP])
    hard, soft = hard_value_gradient(x_t, a), soft_ground_truth(x_t, a)
    assert ((estimate - hard).abs() < 5 * standard_error).all(), (estimate, hard, standard_error)
    assert ((estimate - soft).abs() > 5 * standard_error).any(), "the test cannot tell H from the soft target"


def test_entropy_augmented_return_targets_the_soft_ground_truth() -> None:
    """Theorem B.3: r - KL-to-go makes the same estimator consistent for grad V / alpha, not H."""
    x_t = points_with_large_soft_hard_gap(3)
    estimate, standard_error = zeroth_order_with_standard_error(x_t, 1 << 15, soft=True, seed=1)
    a = float(ABAR[EVAL_TIMESTEP])
    hard, soft = hard_value_gradient(x_t, a), soft_ground_truth(x_t, a)
    assert ((estimate - soft).abs() < 5 * standard_error).all(), (estimate, soft, standard_error)
    assert ((estimate - hard).abs() > 5 * standard_error).any()


@pytest.mark.parametrize("depth", [1, 4, 8])
def test_zeroth_order_lookahead_is_unbiased_at_every_depth(depth: int) -> None:
    """§8.3: with the exact prefactor nu^2 / b, Stein after `depth` steps then Tweedie is unbiased."""
    s = study(1)
    x_t = points_with_large_soft_hard_gap(2)
    particles = est.zeroth_order_particles(
        s.chain(),
        x_t,
        0,
        depth=depth,
        width=1 << 14,
        reward=reward,
        generator=torch.Generator().manual_seed(depth),
    )
    estimate = est.zeroth_order_estimate(particles.rewards, particles.noise, particles.nu, particles.scale)
    centred = particles.rewards - particles.rewards.mean(dim=1, keepdim=True)
    terms = particles.scale / particles.nu * centred.unsqueeze(-1) * particles.noise
    standard_error = terms.std(dim=1) / (1 << 14) ** 0.5
    hard = hard_value_gradient(x_t, float(ABAR[EVAL_TIMESTEP]))
    assert ((estimate - hard).abs() < 5 * standard_error).all()


def test_reward_centring_lowers_rmse_at_equal_nfe() -> None:
    s = study(10)
    particles = est.zeroth_order_particles(
        s.chain(), s.x_t, 0, depth=None, width=256, reward=reward, generator=torch.Generator().manual_seed(5)
    )
    for n in (16, 64, 256):
        errors = {
            center: point_rmse(
                est.zeroth_order_estimate(
                    particles.rewards[:, :n],
                    particles.noise[:, :n],
                    particles.nu,
                    particles.scale,
                    center=center,
                ),
                s.soft_target,
            )
            for center in ("none", "mean")
        }
        assert errors["mean"] < errors["none"], (n, errors)


def test_tree_rollout_shares_noise_and_counts_only_distinct_evaluations() -> None:
    s = study(1)
    chain = s.chain()
    x = s.x_t.repeat_interleave(8, dim=0)
    share = {0: 4, 1: 2}  # step 0: groups of 4; step 1: pairs; afterwards every row is on its own
    run = rollout(chain, x, 0, 3, generator=torch.Generator().manual_seed(0), share=lambda i: share.get(i, 1))
    assert chain.nfe == 2 + 4 + 8  # distinct rows evaluated at steps 0, 1, 2
    assert torch.equal(run.first_noise[0], run.first_noise[3]) and not torch.equal(
        run.first_noise[3], run.first_noise[4]
    )
    assert len(torch.unique(run.final, dim=0)) == 8
    with pytest.raises(ValueError, match="nested"):
        rollout(s.chain(), x, 0, 2, share=lambda i: 2 if i == 1 else 1)


def test_advantages_centre_scale_and_clip_within_groups() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = est.advantages(rewards, groups, center="mean", scale="std", eps=1e-4, clip=5.0)
    std = torch.tensor(2 / 3).sqrt()
    torch.testing.assert_close(adv[:3], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / (std + 1e-4))
    assert adv[3:].abs().max() == 0  # an all-equal group gives zero advantages
    loo = est.advantages(rewards[:3], center="leave-one-out")
    torch.testing.assert_close(loo, torch.tensor([-1.5, 0.0, 1.5], dtype=torch.float64))
    assert est.advantages(torch.tensor([0.0, 100.0]), clip=5.0).abs().max() == 5.0
    with pytest.raises(ValueError, match="leave-one-out"):
        est.advantages(torch.tensor([1.0]), center="leave-one-out")


def test_chain_rejects_a_lookahead_past_its_end() -> None:
    s = study(1)
    with pytest.raises(ValueError, match="leaves the 39-step chain"):
        est.zeroth_order_particles(s.chain(), s.x_t, 0, depth=40, width=2, reward=reward)
    assert isinstance(s.chain(), Chain)


@pytest.mark.slow
def test_large_sample_errors_match_the_spec_numbers() -> None:
    """§8.2 / §8.4 on 50 points at N = 2^18: Z1 vs H ~ 0.005 and vs GT ~ 0.074; the entropy-augmented
    return vs GT ~ 0.007 (the spec's numbers are from one draw; +-30 % as it suggests, wider for the
    seed-dependent small ones)."""
    s = study(50, seed=3)
    width = 1 << 18
    plain, soft = [], []
    for p in range(s.s.points):
        particles = est.zeroth_order_particles(
            s.chain(),
            s.x_t[p : p + 1],
            0,
            depth=None,
            width=width,
            reward=reward,
            generator=torch.Generator().manual_seed(p),
            reference=lambda x, i: oracle(REFERENCE)(x, s.timesteps[i]),
        )
        plain.append(
            est.zeroth_order_estimate(particles.rewards, particles.noise, particles.nu, particles.scale)
        )
        soft_rewards = est.entropy_augmented_return(particles.rewards, particles.path_kl, 1.0)
        soft.append(est.zeroth_order_estimate(soft_rewards, particles.noise, particles.nu, particles.scale))
    plain, soft = torch.cat(plain), torch.cat(soft)
    assert point_rmse(plain, s.hard_target) == pytest.approx(0.005, rel=0.5)
    assert point_rmse(plain, s.soft_target) == pytest.approx(0.074, rel=0.3)
    assert point_rmse(soft, s.soft_target) == pytest.approx(0.007, rel=0.5)
