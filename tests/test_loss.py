"""The canonical RSM loss (theory §2.4), trust regions (§5.3, §6.1) and influence metric (§4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rsm_core import flows, kernels, loss, weighting
from rsm_core.flows import TimePoint


def setup_problem(seed: int = 0, batch: int = 6, dim: int = 8):
    """A small float64 MLP as f_theta, its frozen copies as ref / old, and random coefficients."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, dim)).double()
    x = torch.randn(batch, dim, dtype=torch.float64)
    point = TimePoint.rf(torch.rand(batch, dtype=torch.float64) * 0.8 + 0.1)
    with torch.no_grad():
        s_ref = point.score(x, net(x) + 0.1 * torch.randn_like(x))
        s_old = point.score(x, net(x) + 0.05 * torch.randn_like(x))
    coef = loss.Coefficients(
        c1=torch.rand(batch, dtype=torch.float64) + 0.1,
        g=torch.randn(batch, dim, dtype=torch.float64),
        p=torch.randn(batch, dtype=torch.float64),
    )
    return net, x, point, s_ref, s_old, coef


def flat_grad(value: torch.Tensor, net: nn.Module) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(net.parameters()))])


def expected_gradient(net, x, point, s_ref, s_old, coef) -> torch.Tensor:
    """2 J^T [C1 (s - s_ref) - G + P (s - s_old)], the vector-Jacobian product taken directly."""
    s = point.score(x, net(x))
    c1, p = coef.c1.unsqueeze(1), coef.p.unsqueeze(1)
    residual = (2 * (c1 * (s - s_ref) - coef.g + p * (s - s_old))).detach()
    return flat_grad((s * residual).sum(), net)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_canonical_loss_gradient_is_the_stated_vector_jacobian_product() -> None:
    net, x, point, s_ref, s_old, coef = setup_problem()
    got = flat_grad(loss.rsm_loss(point.score(x, net(x)), s_ref, s_old, coef).sum(), net)
    assert relative_error(got, expected_gradient(net, x, point, s_ref, s_old, coef)) <= 1e-8


def test_perturbing_one_coefficient_breaks_the_equality() -> None:
    """The check above can fail: a 1 % change of C1 on one sample is detected."""
    net, x, point, s_ref, s_old, coef = setup_problem()
    c1 = coef.c1.clone()
    c1[0] *= 1.01
    perturbed = loss.Coefficients(c1, coef.g, coef.p)
    got = flat_grad(loss.rsm_loss(point.score(x, net(x)), s_ref, s_old, perturbed).sum(), net)
    assert relative_error(got, expected_gradient(net, x, point, s_ref, s_old, coef)) > 1e-6


def test_nested_form_has_the_product_form_gradient() -> None:
    net, x, point, s_ref, s_old, coef = setup_problem(1)
    gamma, c2 = torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    psi = torch.randn(6, 8, dtype=torch.float64)
    s = point.score(x, net(x))
    nested = flat_grad(loss.rsm_loss_nested(s, s_ref, s_old, coef.c1, gamma, psi, c2).sum(), net)
    products = loss.Coefficients.from_nested(coef.c1, gamma, psi, c2)
    s = point.score(x, net(x))
    product = flat_grad(loss.rsm_loss(s, s_ref, s_old, products).sum(), net)
    assert relative_error(nested, product) <= 1e-10


def test_coefficients_and_targets_carry_no_gradient() -> None:
    net, x, point, s_ref, s_old, coef = setup_problem(2)
    g = coef.g.clone().requires_grad_(True)
    value = loss.rsm_loss(point.score(x, net(x)), s_ref, s_old, loss.Coefficients(coef.c1, g, coef.p)).sum()
    value.backward()
    assert g.grad is None


def log_ratio_grad(surrogate_fn, log_ratio: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    log_ratio = log_ratio.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(surrogate_fn(log_ratio, adv).loss.sum(), log_ratio)
    return grad


def test_clipped_ratio_is_ppo_and_its_mask_marks_the_samples_with_gradient() -> None:
    log_ratio = torch.tensor([-0.3, -0.01, 0.0, 0.01, 0.3, -0.3, 0.3, 0.1], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 0.5], dtype=torch.float64)
    out = loss.clipped_ratio(log_ratio, adv, 0.2)
    ratio = log_ratio.exp()
    torch.testing.assert_close(out.loss, torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)))
    grad = log_ratio_grad(lambda lr, a: loss.clipped_ratio(lr, a, 0.2), log_ratio, adv)
    assert torch.equal(out.active, grad != 0)


def test_matching_and_clipped_log_ratio_have_identical_gradients() -> None:
    """§5.3 PCPO-base: max(eps|A| - A log rho, 0) and the clipped 1 + log rho surrogate."""
    g = torch.Generator().manual_seed(4)
    log_ratio = torch.randn(200, generator=g, dtype=torch.float64) * 2e-4
    adv = torch.randn(200, generator=g, dtype=torch.float64)
    eps = 1e-4
    a = log_ratio_grad(lambda lr, ad: loss.matching(lr, ad, eps), log_ratio, adv)
    b = log_ratio_grad(lambda lr, ad: loss.clipped_log_ratio(lr, ad, eps), log_ratio, adv)
    torch.testing.assert_close(a, b)
    assert 0 < int((a != 0).sum()) < 200  # both branches occur


def test_fair_clip_without_clipping_scales_the_gradient_by_gamma() -> None:
    """§6.1: unclipped, the fair-clip gradient is gamma_t times the unweighted surrogate's."""
    log_ratio = torch.tensor([1e-3, -2e-3, 5e-4], dtype=torch.float64)
    adv = torch.tensor([0.7, -1.2, 0.3], dtype=torch.float64)
    nu2 = torch.tensor([0.49, 0.2, 0.05], dtype=torch.float64)
    gamma = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    clip_scale, weight = loss.fair_clip_scales(nu2.sqrt(), gamma)
    for form, plain in (("ratio", loss.clipped_ratio), ("matching", loss.matching)):
        fair = log_ratio_grad(
            lambda lr, a, f=form: loss.scaled_surrogate(
                lr, a, 1.0, form=f, clip_scale=clip_scale, weight=weight
            ),
            log_ratio,
            adv,
        )
        unweighted = log_ratio_grad(lambda lr, a, p=plain: p(nu2 * lr, a, 1.0), log_ratio, adv)
        torch.testing.assert_close(fair, gamma / nu2 * unweighted)
        if form == "ratio":  # first order: the same as the plain PPO gradient -A (times gamma)
            torch.testing.assert_close(fair, -gamma * adv * (nu2 * log_ratio).exp())


def test_influence_of_the_kl_regularised_kernel_is_w_nu() -> None:
    """§4 (D.3): C1 = alpha b^2 / (2 nu^2), gamma = 1, c = nu^2 / (alpha b) gives h = w nu."""
    sigmas = flows.sd3_sigmas(10)
    abar, abar_prev = flows.ddim_alpha_pairs(flows.vp_alphas_cumprod(), flows.ddim_timesteps(50))
    # from t = 0.96 on: at t = 1 b_t is infinite and C1 * c is inf * 0 (the spec: use w_t there)
    flow = kernels.flow_grpo_sde(sigmas[1:9], sigmas[2:10], t_max=float(sigmas[1]))
    for k in (flow, kernels.ddim(abar, abar_prev)):
        alpha = 0.04
        h = weighting.influence(
            alpha * k.b**2 / (2 * k.nu**2), torch.ones_like(k.nu), k.kappa, k.nu**2 / (alpha * k.b)
        )
        torch.testing.assert_close(h, k.w * k.nu)
        normalized = weighting.normalized(h)
        assert normalized.sum().item() == pytest.approx(1.0)


def test_temporal_weights_match_the_spec() -> None:
    sigmas = flows.sd3_sigmas(10)
    k = kernels.flow_grpo_sde(sigmas[:9], sigmas[1:10], t_max=float(sigmas[1]))
    torch.testing.assert_close(weighting.tempflow_weight(k.nu), 2.25 * k.nu, atol=0.01, rtol=0)
    delta = sigmas[:9] - sigmas[1:10]
    torch.testing.assert_close(
        weighting.grpo_guard_weight(k.nu, delta),
        k.point.sigma.new_tensor([17.557, 15.882, 9.633, 6.623, 4.715, 3.356, 2.324, 1.509, 0.837]),
        atol=5e-4,
        rtol=0,
    )
    t = torch.tensor([0.0, 0.5, 1.0])
    assert weighting.vgg_flow_eta(t, "quad").tolist() == [1.0, 0.25, 0.0]
    assert weighting.sqdf_discount(0.9, torch.tensor([0, 2])).tolist() == pytest.approx([1.0, 0.81])
    with pytest.raises(ValueError, match="positive sum"):
        weighting.normalized(torch.zeros(3))
    with pytest.raises(ValueError, match="quad"):
        weighting.vgg_flow_eta(t, "cubic")
