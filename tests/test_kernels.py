"""Reverse kernels and conversions against the theory spec §1 and §7, in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rsm_core import flows, grids, kernels
from rsm_core.flows import TimePoint

pytestmark = pytest.mark.usefixtures("float64")


def sd15_ddpm() -> kernels.Kernel:
    return grids.sd15_ddpm().kernel


def sd35_flow_grpo() -> tuple[torch.Tensor, kernels.Kernel]:
    """All 10 steps of the SD3.5 grid (training uses the first 9) and the grid's sigmas."""
    return flows.sd3_sigmas(10, shift=3.0), grids.sd35_flow_grpo(trained=10).kernel


def all_stochastic_kernels() -> list[kernels.Kernel]:
    abar, abar_prev = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.6, 0.95])
    t, t_prev = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.4, 0.1])
    return [
        kernels.ddim(abar, abar_prev, 1.0),
        kernels.ddim(abar, abar_prev, 0.4),
        kernels.dpm_solver_pp1_sde(abar, abar_prev),
        kernels.flow_grpo_sde(t, t_prev, t_max=0.95),
        kernels.dance_sde(t, t_prev, 0.3),
        kernels.flow_sde(t, t_prev, torch.tensor([0.2, 0.7, 1.1])),
    ]


def random_state(seed: int = 0, shape: tuple[int, ...] = (3, 4, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_zero_noise_sde_steps_equal_the_ode_step() -> None:
    """DDIM(eta=0) and flow SDEs with sigma_tilde = 0 are the (independently written) ODE steps."""
    x, f = random_state()
    abar, abar_prev = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.6, 0.95])
    t, t_prev = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.4, 0.1])
    pairs = [
        (kernels.ddim(abar, abar_prev, 0.0), kernels.vp_ode(abar, abar_prev)),
        (kernels.flow_sde(t, t_prev, 0.0), kernels.flow_ode(t, t_prev)),
        (kernels.dance_sde(t, t_prev, 0.0), kernels.flow_ode(t, t_prev)),
    ]
    for sde, ode in pairs:
        torch.testing.assert_close(sde.mean(x, f), ode.mean(x, f), rtol=1e-12, atol=1e-12)
    for kernel in all_stochastic_kernels():
        ode = kernel.deterministic()
        assert not ode.stochastic
        expected = (
            kernels.vp_ode(kernel.point.alpha**2, kernel.prev.alpha**2)
            if kernel.point.prediction == "eps"
            else kernels.flow_ode(kernel.point.sigma, kernel.prev.sigma)
        )
        torch.testing.assert_close(ode.mean(x, f), expected.mean(x, f), rtol=1e-12, atol=1e-12)


def test_sde_dpm_solver_pp1_equals_ddim_at_eta_one_on_the_sd15_grid() -> None:
    abar, abar_prev = flows.ddim_alpha_pairs(flows.vp_alphas_cumprod(), flows.ddim_timesteps(50))
    dpm, ddpm = kernels.dpm_solver_pp1_sde(abar, abar_prev), kernels.ddim(abar, abar_prev, 1.0)
    for name in ("x_coef", "f_coef", "nu"):
        torch.testing.assert_close(getattr(dpm, name), getattr(ddpm, name), rtol=1e-12, atol=1e-14)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.001, 0.98), st.floats(0.01, 0.99))
def test_dpm_solver_pp1_equals_ddim_for_any_step(abar: float, fraction: float) -> None:
    abar_prev = abar + fraction * (1 - abar) * 0.999
    dpm, ddpm = kernels.dpm_solver_pp1_sde(abar, abar_prev), kernels.ddim(abar, abar_prev, 1.0)
    for name in ("x_coef", "f_coef", "nu"):
        torch.testing.assert_close(getattr(dpm, name), getattr(ddpm, name), rtol=1e-9, atol=1e-12)


def test_a_t_is_alpha_ratio_and_mean_is_a_x_plus_b_score() -> None:
    x, f = random_state()
    for kernel in all_stochastic_kernels():
        torch.testing.assert_close(kernel.a, kernel.prev.alpha / kernel.point.alpha, rtol=1e-12, atol=0)
        score = kernel.point.score(x, f)
        expected = flows.per_sample(kernel.a, x) * x + flows.per_sample(kernel.b, x) * score
        torch.testing.assert_close(kernel.mean(x, f), expected, rtol=1e-10, atol=1e-12)


def test_sd15_ddpm_mean_weight_matches_the_pcpo_constant() -> None:
    """§7: mean_t w_t = 0.51690 on the 50-step grid and 4.5 / mean = 8.70574 (PCPO's uw constants)."""
    w = sd15_ddpm().w
    assert w.mean().item() == pytest.approx(0.5168997, abs=5e-7)
    assert (4.5 / w.mean()).item() == pytest.approx(8.70575, abs=2e-5)


def test_pcpo_uw_sigma_sampler_matches_the_spec_facts() -> None:
    """zo_diffusion_pcpo.md §2: (c1 + c2)/nu' = 4.5 at every step; nu' = 0.446712 at t = 981 and
    0.014764 at t = 1; the kernel weight w' = (c1 - c2)/nu' stays near DDPM's (0.513 at 981, 3.368 at 21)."""
    grid = grids.sd15_pcpo(trained=50)
    abar, abar_prev = grid.kernel.point.alpha**2, grid.kernel.prev.alpha**2
    nu = grid.kernel.nu
    c1 = (1 - abar).sqrt() * (abar_prev / abar).sqrt()
    c2 = (1 - abar_prev - nu**2).sqrt()
    torch.testing.assert_close((c1 + c2) / nu, torch.full_like(nu, 4.5), rtol=1e-12, atol=0)
    assert nu[0].item() == pytest.approx(0.446712, abs=1e-6) and nu[-1].item() == pytest.approx(
        0.014764, abs=1e-6
    )
    w = grid.kernel.w
    assert w[0].item() == pytest.approx(0.513, abs=5e-4) and w[48].item() == pytest.approx(3.368, abs=5e-4)


def test_kernel_select_picks_steps_of_a_grid() -> None:
    kernel = sd15_ddpm()
    index = torch.tensor([3, 0, 3])
    picked = kernel.select(index)
    for name in ("x_coef", "f_coef", "nu", "w", "kappa"):
        torch.testing.assert_close(getattr(picked, name), getattr(kernel, name)[index], rtol=0, atol=0)


def test_sd35_ten_step_schedule_matches_the_spec_table() -> None:
    """zo_flow_tempflow.md §3: sigmas, sigma_tilde, nu, w, 2.25 nu and nu/delta of the 10-step grid."""
    sigmas, k = sd35_flow_grpo()
    table_sigma = [1.0, 0.96013, 0.91335, 0.85769, 0.79037, 0.70728, 0.60215, 0.46488, 0.27805, 0.00893]
    table_nu = [0.7000, 0.7430, 0.5362, 0.4459, 0.3918, 0.3528, 0.3191, 0.2820, 0.2254]
    table_w = [0.0570, 0.0784, 0.1292, 0.1880, 0.2640, 0.3710, 0.5356, 0.8248, 1.4867]
    table_nu_over_delta = [17.557, 15.882, 9.633, 6.623, 4.715, 3.356, 2.324, 1.509, 0.837]
    torch.testing.assert_close(sigmas[:10], torch.tensor(table_sigma), atol=5e-6, rtol=0)
    torch.testing.assert_close(k.nu[:9], torch.tensor(table_nu), atol=5e-5, rtol=0)
    torch.testing.assert_close(k.w[:9], torch.tensor(table_w), atol=5e-5, rtol=0)
    delta = sigmas[:-1] - sigmas[1:]
    torch.testing.assert_close((k.nu / delta)[:9], torch.tensor(table_nu_over_delta), atol=5e-4, rtol=0)
    sigma_tilde = kernels.flow_grpo_noise_level(sigmas[0], t_max=float(sigmas[1]))
    assert sigma_tilde.item() == pytest.approx(3.5057, abs=5e-5)
    assert (2.25 * k.nu[:9]).mean().item() == pytest.approx(1.0, abs=0.002)


def test_rectified_flow_first_step_is_finite_where_a_and_b_diverge() -> None:
    _, k = sd35_flow_grpo()
    x, f = random_state(shape=(10, 3))
    assert torch.isfinite(k.mean(x, f)).all() and torch.isfinite(k.w).all() and torch.isfinite(k.nu).all()
    assert torch.isinf(k.a[0]) and torch.isinf(k.b[0])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_log_prob_equals_torch_normal(reduction: str) -> None:
    x, f = random_state()
    for kernel in all_stochastic_kernels():
        x_next = kernel.sample(x, f)
        normal = torch.distributions.Normal(kernel.mean(x, f), flows.per_sample(kernel.nu, x))
        elementwise = normal.log_prob(x_next)
        expected = elementwise.sum((1, 2)) if reduction == "sum" else elementwise.mean((1, 2))
        torch.testing.assert_close(kernel.log_prob(x_next, x, f, reduction), expected, rtol=1e-12, atol=1e-12)


def test_closed_form_kl_equals_monte_carlo() -> None:
    """KL(p||q) = (w^2/2)||df||^2 agrees with E_p[log p - log q] within 5 standard errors."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, generator=g).expand(200_000, 6)
    f_p, f_q = torch.randn(1, 6, generator=g).expand_as(x), torch.randn(1, 6, generator=g).expand_as(x)
    for kernel in (kernels.ddim(0.3, 0.4, 1.0), kernels.flow_grpo_sde(0.7, 0.6, t_max=0.96)):
        x_next = kernel.mean(x, f_p) + kernel.nu * torch.randn(x.shape, generator=g)
        samples = kernel.log_prob(x_next, x, f_p) - kernel.log_prob(x_next, x, f_q)
        closed = kernel.kl(f_p[:1], f_q[:1])[0]
        standard_error = samples.std() / samples.numel() ** 0.5
        assert abs(samples.mean() - closed) < 5 * standard_error, (samples.mean(), closed)
        torch.testing.assert_close(closed, 0.5 * kernel.w**2 * ((f_p[0] - f_q[0]) ** 2).sum())


def test_log_ratio_native_form_for_eps_and_v_prediction() -> None:
    """§1.4: -log rho = (w^2/2)||df||^2 + w <df, eps> with x' = mean_old + nu eps."""
    x, f_old = random_state(1)
    _, f_new = random_state(2)
    for kernel in all_stochastic_kernels():
        eps = torch.randn_like(x)
        x_next = kernel.sample(x, f_old, eps)
        log_rho = kernel.log_prob(x_next, x, f_new) - kernel.log_prob(x_next, x, f_old)
        w = flows.per_sample(kernel.w, x)
        diff = f_new - f_old
        expected = (0.5 * w**2 * diff**2 + w * diff * eps).sum((1, 2))
        torch.testing.assert_close(-log_rho, expected, rtol=1e-9, atol=1e-9)


def elementwise_slope(fn, f: torch.Tensor) -> torch.Tensor:
    """d fn(f) / d f for a map that acts element by element (the gradient of its sum)."""
    f = f.clone().requires_grad_(True)
    (slope,) = torch.autograd.grad(fn(f).sum(), f)
    return slope


@pytest.mark.parametrize(
    "point", [TimePoint.vp(torch.tensor([0.2, 0.7])), TimePoint.rf(torch.tensor([0.3, 0.9]))]
)
def test_kappa_agrees_with_autograd_and_conversions_round_trip(point: TimePoint) -> None:
    x, f = random_state(shape=(2, 3))
    kappa = point.kappa.unsqueeze(1).expand(2, 3)
    torch.testing.assert_close(elementwise_slope(lambda f_: point.score(x, f_), f), kappa)
    torch.testing.assert_close(point.native(x, point.score(x, f)), f)
    x0, eps = point.x0(x, f), point.eps(x, f)
    torch.testing.assert_close(
        flows.per_sample(point.alpha, x) * x0 + flows.per_sample(point.sigma, x) * eps, x
    )


def test_w_is_the_mean_sensitivity_per_unit_std() -> None:
    x, f = random_state(shape=(3, 2))
    for kernel in all_stochastic_kernels():
        slope = elementwise_slope(lambda f_, k=kernel: k.mean(x, f_), f)
        torch.testing.assert_close(slope.abs() / kernel.nu.unsqueeze(1), kernel.w.unsqueeze(1).expand(3, 2))
        torch.testing.assert_close(kernel.w, kernel.b * kernel.kappa.abs() / kernel.nu)


def test_general_affine_kappa_reduces_to_rectified_flow() -> None:
    t = torch.tensor([0.1, 0.5, 0.95])
    torch.testing.assert_close(
        flows.affine_velocity_kappa(1 - t, t, -torch.ones_like(t), torch.ones_like(t)), TimePoint.rf(t).kappa
    )


def test_kernel_rejects_what_has_no_density() -> None:
    x, f = random_state()
    with pytest.raises(ValueError, match="ODE step has no density"):
        kernels.flow_ode(0.5, 0.4).log_prob(x, x, f)
    with pytest.raises(ValueError, match="shape"):
        kernels.ddim(torch.tensor([0.1, 0.2]), torch.tensor([0.2, 0.3])).mean(x, f)
