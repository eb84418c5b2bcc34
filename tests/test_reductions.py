"""The reduction checker (theory spec §5.1): every baseline's native loss has the gradient of the
canonical RSM loss with its declared coefficients, per sample, in float64, to relative error 1e-8.

A small random network gives native outputs for a random batch at random steps of the method's own
paper grid; theta starts at theta_old (first update, anchor inactive) and is then moved (anchor
active; for clipped methods over several distances so that clipped and unclipped samples both occur).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn

from baselines import grpo, registry, residual_nabla_db, tempflow_grpo, vgg_flow
from baselines.common import terminal_rows_mean
from baselines.method import Family, Method
from rsm_core import grids
from rsm_core.kernels import reduce_per_sample
from rsm_core.loss import Coefficients, rsm_loss
from rsm_core.transitions import Transitions

pytestmark = pytest.mark.usefixtures("float64")

SHAPE = (3, 4)  # d = 12 latent elements per sample
BATCH = 8
TOLERANCE = 1e-8
MOVES = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)  # parameter displacements theta - theta_old


class TinyNet(nn.Module):
    """f(x, t): an MLP on the flattened latent and the time, output shaped like x."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        d = int(torch.tensor(SHAPE).prod())
        self.body = nn.Sequential(nn.Linear(d + 1, 24), nn.Tanh(), nn.Linear(24, d))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        inputs = torch.cat([x.flatten(1), t.reshape(-1, 1).to(x.dtype)], dim=1)
        return self.body(inputs).reshape(x.shape)


def frozen_lookahead_reward() -> Callable[[Tensor], Tensor]:
    """x' -> r(x0_hat(x')): a frozen nonlinear denoiser and reward, with rewards of both signs."""
    gen = torch.Generator().manual_seed(7)
    d = int(torch.tensor(SHAPE).prod())
    denoise, score = torch.randn(d, d, generator=gen) / d**0.5, torch.randn(d, generator=gen)

    def reward(x_next: Tensor) -> Tensor:
        flat = x_next.flatten(1)
        x0_hat = flat - 0.3 * torch.tanh(flat @ denoise)
        return torch.tanh(x0_hat) @ score / d**0.5 + 0.1

    return reward


def make_rows(
    method: Method, policy: TinyNet, reference: TinyNet, seed: int = 0, signal_scale: float = 1.0
) -> tuple[Transitions, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grid = method.grid()
    index = torch.randint(len(grid), (BATCH,), generator=gen)
    index[0] = 0  # always include the grid's first step (t = 1 on rectified flow, where kappa = 0)
    kernel = grid.kernel.select(index)
    time = kernel.point.sigma
    x = torch.randn(BATCH, *SHAPE, generator=gen)
    advantage = 3 * torch.randn(BATCH, generator=gen)  # some beyond the +-5 advantage clip
    advantage[1] = 0.0  # a masked row for methods that mask zero advantages
    rows = Transitions(
        kernel=kernel,
        x=x,
        f_old=policy(x, time).detach(),
        f_ref=reference(x, time).detach(),
        noise=torch.randn(BATCH, *SHAPE, generator=gen),
        advantage=advantage,
        reward=torch.randn(BATCH, generator=gen),
        reward_grad=signal_scale * torch.randn(BATCH, *SHAPE, generator=gen),
        steps_remaining=grid.steps_remaining[index],
        branch_weight=0.5 + 1.5 * torch.rand(BATCH, generator=gen),
        lookahead_reward=frozen_lookahead_reward(),
        time=time,
        time_next=kernel.prev.sigma,
        policy_field=policy,
        reference_field=reference,
        aux_field=TinyNet(4).double(),  # the unpruned algorithms' value or residual network
        sample_reward=frozen_lookahead_reward(),
    )
    return rows, time


def moved(net: TinyNet, distance: float, seed: int = 1) -> TinyNet:
    """A copy of net with every parameter displaced by distance * N(0, 1)."""
    copy = TinyNet(0)
    copy.load_state_dict(net.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(distance * torch.randn(p.shape, generator=gen))
    return copy


def gradient(value: Tensor, params: list[Tensor]) -> Tensor:
    """The flat gradient of a scalar; parameters it does not reach get exact zeros."""
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params, strict=True)]
    )


def per_sample_gradients(losses: Tensor, params: list[Tensor]) -> Tensor:
    return torch.stack([gradient(value, params) for value in losses])


def relative_errors(native: Tensor, canonical: Tensor) -> Tensor:
    """Per-sample ||g_native - g_rsm|| / max(||g_native||, ||g_rsm||) (0 where both vanish)."""
    scale = torch.maximum(native.norm(dim=1), canonical.norm(dim=1))
    return torch.where(scale > 0, (native - canonical).norm(dim=1) / scale.clamp(min=1e-300), 0.0)


def check(method: Method, net: TinyNet, rows: Transitions, time: Tensor, perturb=None):
    """(per-sample relative errors, active mask) of native vs canonical gradients at net's theta."""
    params = list(net.parameters())
    f_theta = net(rows.x, time)
    native = method.loss(f_theta, rows, method.config)
    coef = method.coefficients(f_theta, rows, method.config, native.active)
    if perturb is not None:
        coef = perturb(coef)
    canonical = rsm_loss(f_theta, rows.f_ref, rows.f_old, coef)
    errors = relative_errors(
        per_sample_gradients(native.loss, params), per_sample_gradients(canonical, params)
    )
    return errors, native.active


def clipped(method: Method) -> bool:
    return hasattr(method.config, "clip_range")


# one case per distinct loss and config (several redesigns share a loss and differ in their profile)
REDUCED = tuple({(m.loss, m.coefficients, m.config): m for m in registry.reduced()}.values())
IDS = [m.name for m in REDUCED]


@pytest.fixture(scope="module")
def nets() -> tuple[TinyNet, TinyNet]:
    return TinyNet(0).double(), TinyNet(1).double()


@pytest.mark.parametrize("method", REDUCED, ids=IDS)
def test_gradient_equals_canonical_at_theta_old(method: Method, nets) -> None:
    policy, reference = nets
    rows, time = make_rows(method, policy, reference)
    errors, _ = check(method, policy, rows, time)
    assert errors.max() <= TOLERANCE, f"{method.name}: relative errors {errors.tolist()}"


@pytest.mark.parametrize("method", REDUCED, ids=IDS)
def test_gradient_equals_canonical_after_theta_moves(method: Method, nets) -> None:
    policy, reference = nets
    rows, time = make_rows(method, policy, reference)
    seen_active, seen_clipped = False, False
    for distance in MOVES if clipped(method) else MOVES[:1]:
        errors, active = check(method, moved(policy, distance), rows, time)
        assert errors.max() <= TOLERANCE, f"{method.name} at distance {distance}: {errors.tolist()}"
        seen_active |= bool(active.any())
        seen_clipped |= bool((~active).any())
    if clipped(method):
        assert seen_active and seen_clipped, "the moves must exercise both clip branches"


def _scaled(coef: Coefficients, name: str, factor: float) -> Coefficients:
    return replace(coef, **{name: getattr(coef, name) * factor})


@pytest.mark.parametrize("name", ["c1", "g", "p"])
@pytest.mark.parametrize("method", REDUCED, ids=IDS)
def test_a_perturbed_coefficient_is_detected(method: Method, name: str, nets) -> None:
    """Scaling one declared coefficient by 1.1 breaks the identity (where that term has a gradient).
    The reward gradient is scaled down by the method's reward scale so that, with the redesign's
    small sigma~ strengths too, the C1 term is not drowned by R g."""
    policy, reference = nets
    rows, time = make_rows(
        method, policy, reference, signal_scale=1 / getattr(method.config, "reward_scale", 1.0)
    )
    net = moved(policy, 1e-1)
    f_theta = net(rows.x, time)
    coef = method.coefficients(f_theta, rows, method.config, method.loss(f_theta, rows, method.config).active)
    if not bool(getattr(coef, name).abs().sum() > 0):
        pytest.skip(f"{method.name} declares {name} = 0")
    errors, _ = check(method, net, rows, time, perturb=lambda c: _scaled(c, name, 1.1))
    assert errors.max() > 100 * TOLERANCE  # the checker flags anything above TOLERANCE


# --- the first-order configs: every allowed combination reduces exactly ---------------------------

NABLA_DB_CONFIGS = {
    "paper": residual_nabla_db.PAPER,
    "redesign": residual_nabla_db.REDESIGN,
    "unpruned": residual_nabla_db.UNPRUNED,
    "kernel-gap": replace(residual_nabla_db.REDESIGN, sigma_gap=20),
    **{
        f"strength={strength}/factor={factor}/policy={policy}": residual_nabla_db.NablaDBConfig(
            pretrained_strength=strength, reward_adaptive_mode=factor, policy_score_strength=policy
        )
        for strength in (0.7, "sigma")
        for factor in ("squared", "sigma")
        for policy in ("lambda", "one")
    },
}
VGG_FLOW_CONFIGS = {
    "paper": vgg_flow.PAPER,
    "redesign": vgg_flow.REDESIGN,
    "linear-a": vgg_flow.LINEAR_A,
    "linear-b": vgg_flow.LINEAR_B,
}
FIRST_ORDER_CASES = [
    pytest.param("residual-nabla-db", config, id=f"nabla-db/{name}")
    for name, config in NABLA_DB_CONFIGS.items()
] + [pytest.param("vgg-flow", config, id=f"vgg-flow/{name}") for name, config in VGG_FLOW_CONFIGS.items()]


@pytest.mark.parametrize(("name", "config"), FIRST_ORDER_CASES)
def test_every_first_order_config_reduces(name: str, config, nets) -> None:
    """Exact at theta_old and away from it, on rows that include t = 21 and t = 1 (where sigma~_t
    departs most from nu_t); scaling G by 1.1 is detected."""
    method = replace(registry.get(name), config=config)
    policy, reference = nets
    rows, time = make_rows(method, policy, reference)
    grid = method.grid()
    index = torch.randint(len(grid), (BATCH,), generator=torch.Generator().manual_seed(3))
    index[:3] = torch.tensor([0, len(grid) - 2, len(grid) - 1])
    rows = replace(rows, kernel=grid.kernel.select(index))
    time = rows.kernel.point.sigma
    rows = replace(rows, f_old=policy(rows.x, time).detach(), f_ref=reference(rows.x, time).detach())
    away = moved(policy, 1e-1)
    for net in (policy, away):
        errors, _ = check(method, net, rows, time)
        assert errors.max() <= TOLERANCE, f"{name} {config}: relative errors {errors.tolist()}"
    errors, _ = check(method, away, rows, time, perturb=lambda c: _scaled(c, "g", 1.1))
    assert errors.max() > 100 * TOLERANCE


def test_the_policy_strength_one_changes_the_loss(nets) -> None:
    """With l_t != 1 the original's strength-1 policy score is a different loss from the RSM trainer's."""
    method = registry.get("residual-nabla-db")
    policy, reference = nets
    rows, time = make_rows(method, policy, reference)
    rows = replace(rows, reward_grad=torch.zeros_like(rows.x))  # the scores alone
    f_theta = moved(policy, 1e-1)(rows.x, time)
    rsm = replace(residual_nabla_db.REDESIGN, policy_score_strength="lambda")
    original = replace(residual_nabla_db.REDESIGN, policy_score_strength="one")
    losses = [residual_nabla_db.loss(f_theta, rows, config).loss for config in (rsm, original)]
    assert torch.all((losses[0] - losses[1]).abs() > 0.1 * losses[0])


def test_the_ratio_form_needs_its_per_sample_ratio(nets) -> None:
    """PPO's ratio form matches the log form's coefficients only at theta_old: away from it the
    gradient differs by the factor rho per sample."""
    method = registry.get("grpo")
    policy, reference = nets
    rows, time = make_rows(method, policy, reference)
    log_form = replace(
        method, coefficients=lambda f, r, c, a: grpo.coefficients(f, r, replace(c, form="log_ratio"), a)
    )
    at_old, _ = check(log_form, policy, rows, time)
    away, active = check(log_form, moved(policy, 1e-2), rows, time)
    assert at_old.max() <= TOLERANCE
    assert away[active].max() > 1e3 * TOLERANCE


# the published TempFlow-GRPO trainer's other reweight options: baselines trained without a row of their own
TRAINER_OPTIONS = ("tempflow-grpo-guard", "tempflow-pcpo")


def test_every_method_declares_a_table_row_and_the_unreduced_say_why() -> None:
    names = [m.name for m in registry.METHODS]
    assert len(names) == len(set(names))
    for method in registry.METHODS:
        if method in registry.published():
            assert all(vars(method.table).values()), method.name
        elif method.family is Family.BASELINE:  # an unpruned original or a trainer's option: no row
            assert method.name.endswith("-unpruned") or method.name in TRAINER_OPTIONS, method.name
            assert method.reduced, method.name
        else:  # a redesign is not a row of Table 1, but its reduction is checked like a baseline's
            assert method.table is None and method.reduced, method.name
        if not method.reduced:
            assert method.note.startswith("not reduced:"), method.name
        else:
            assert method.loss is not None and method.coefficients is not None, method.name


# --- unpruned variants: which extra terms reach theta ------------------------------------------


def _theta_check(method: Method, policy, rows, time, total: Tensor, extra: Tensor, coefficients) -> None:
    """theta-gradient of the unpruned total = canonical with the auxiliary net folded into G, and
    differs from the pruned reduction (the term the reduction drops)."""
    params = list(policy.parameters())
    f_theta = policy(rows.x, time)
    native = per_sample_gradients(total, params)
    folded = coefficients(f_theta, rows, method.config, torch.ones(BATCH, dtype=torch.bool), extra)
    pruned = coefficients(f_theta, rows, method.config, torch.ones(BATCH, dtype=torch.bool))
    with_extra = per_sample_gradients(rsm_loss(f_theta, rows.f_ref, rows.f_old, folded), params)
    without = per_sample_gradients(rsm_loss(f_theta, rows.f_ref, rows.f_old, pruned), params)
    assert relative_errors(native, with_extra).max() <= TOLERANCE
    assert relative_errors(native, without).max() > 1e3 * TOLERANCE


def _nabla_db_unpruned(nets, terminal_rows: list[int], group_rows: int = 1):
    """(method, policy, residual net, rows, time, terminal mask, residual_next, terms) of the unpruned
    nabla-DB on rows at steps other than the last, but ``terminal_rows`` at the last (t = 1 -> x_0)."""
    config = replace(residual_nabla_db.UNPRUNED, terminal_group_rows=group_rows)
    method = replace(registry.get("residual-nabla-db"), config=config)
    policy, reference = nets
    policy = moved(policy, 1e-1)  # the trust-region anchor active too
    residual = TinyNet(3).double()
    rows, time = make_rows(method, policy, reference)
    grid = method.grid()
    index = torch.arange(BATCH) * 7 % (len(grid) - 1)
    index[terminal_rows] = len(grid) - 1
    kernel = grid.kernel.select(index)
    time, time_next = kernel.point.sigma, kernel.prev.sigma
    rows = replace(rows, kernel=kernel, f_ref=reference(rows.x, time).detach())
    terminal = index == len(grid) - 1
    residual_next = residual(rows.x_next.detach(), time_next)
    terms = residual_nabla_db.unpruned_loss(
        policy(rows.x, time),
        rows,
        method.config,
        policy_at=lambda x: policy(x, time),
        reference_at=lambda x: reference(x, time),
        residual_now=residual(rows.x, time),
        residual_next=residual_next,
        reward_grad_now=torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(5)),
        terminal=terminal,
    )
    return method, policy, residual, rows, time, terminal, residual_next, terms


def test_unpruned_nabla_db_extra_terms(nets) -> None:
    method, policy, residual, rows, time, terminal, residual_next, terms = _nabla_db_unpruned(
        nets, [BATCH - 1]
    )
    theta, phi = list(policy.parameters()), list(residual.parameters())
    for name in ("backward", "terminal"):
        term = getattr(terms, name).sum()
        assert torch.all(gradient(term, theta) == 0), f"{name} must carry no gradient to theta"
        assert gradient(term, phi).abs().max() > 0, f"{name} trains the residual network"
    assert gradient(terms.forward.sum(), phi).abs().max() > 0
    live = (~terminal).to(rows.x.dtype).reshape(-1, 1, 1)
    _theta_check(
        method,
        policy,
        rows,
        time,
        terms.total(method.config),
        live * residual_next,
        residual_nabla_db.coefficients,
    )


def _published_terminal_loss(values: Tensor, terminal: Tensor, group_rows: int) -> Tensor:
    """The published (values * mask).sum() / (mask.sum() + 1e-6) of each microbatch of ``group_rows``
    rows, averaged over the microbatches, written out by hand."""
    losses = []
    for start in range(0, len(values), group_rows):
        mask = terminal[start : start + group_rows].to(values.dtype)
        losses.append((values[start : start + group_rows] * mask).sum() / (mask.sum() + 1e-6))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("group_rows", [1, 2, BATCH])
def test_terminal_rows_mean_is_the_published_mean_of_each_microbatch(group_rows: int) -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(BATCH, generator=generator, dtype=torch.float64)
    terminal = torch.zeros(BATCH, dtype=torch.bool)
    terminal[[0, 1, 5]] = True  # groups of two with two, one and no terminal rows
    terms = terminal_rows_mean(values, terminal, group_rows)
    expected = _published_terminal_loss(values, terminal, group_rows)
    assert torch.isclose(terms.mean(), expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="published microbatches of 3 rows"):
        terminal_rows_mean(values[:4], terminal[:4], 3)


def test_unpruned_nabla_db_terminal_loss_is_the_published_mean(nets) -> None:
    for group_rows in (1, BATCH):
        *_, terminal, residual_next, terms = _nabla_db_unpruned(nets, [2, 5], group_rows)
        assert int(terminal.sum()) == 2
        values = reduce_per_sample(residual_next**2, "mean")
        published = _published_terminal_loss(values, terminal, group_rows)
        assert torch.isclose(terms.terminal.mean(), published, rtol=1e-12, atol=0)
    *_, terminal, _, terms = _nabla_db_unpruned(nets, [])
    assert not terminal.any() and torch.all(terms.terminal == 0)


def _vgg_flow_unpruned(nets, terminal_rows: list[int], group_rows: int = 1):
    """(method, policy, value net, rows, time, terms) of the unpruned VGG-Flow with ``terminal_rows``
    marked as rows at the last sampling time."""
    method = registry.get("vgg-flow")
    method = replace(method, config=replace(method.config, terminal_group_rows=group_rows))
    policy, reference = nets
    value = TinyNet(4).double()
    rows, time = make_rows(method, policy, reference)
    terminal = torch.zeros(BATCH, dtype=torch.bool)
    terminal[terminal_rows] = True
    terms = vgg_flow.unpruned_loss(
        policy(rows.x, time),
        rows,
        method.config,
        policy=policy,
        reference=reference,
        value=value,
        reward=frozen_lookahead_reward(),
        terminal=terminal,
    )
    return method, policy, value, rows, time, terms


def test_unpruned_vgg_flow_extra_terms(nets) -> None:
    method, policy, value, rows, time, terms = _vgg_flow_unpruned(nets, [BATCH - 1])
    theta, psi = list(policy.parameters()), list(value.parameters())
    for name in ("consistency", "terminal"):
        term = getattr(terms, name).sum()
        assert torch.all(gradient(term, theta) == 0), f"{name} must carry no gradient to theta"
        assert gradient(term, psi).abs().max() > 0, f"{name} trains the value network"
    assert torch.all(gradient(terms.velocity.sum(), psi) == 0), "the velocity target is detached"
    _theta_check(
        method, policy, rows, time, terms.total(method.config), value(rows.x, time), vgg_flow.coefficients
    )


def test_unpruned_vgg_flow_terminal_loss_is_the_published_mean(nets) -> None:
    terminal = torch.zeros(BATCH, dtype=torch.bool)
    terminal[[0, 3, 6]] = True
    for group_rows in (1, BATCH):
        _, _, value, rows, time, terms = _vgg_flow_unpruned(nets, [0, 3, 6], group_rows)
        values = reduce_per_sample(value(rows.x, time) ** 2, "mean")
        published = _published_terminal_loss(values, terminal, group_rows)
        assert torch.isclose(terms.terminal.mean(), published, rtol=1e-12, atol=0)
    assert torch.all(_vgg_flow_unpruned(nets, [])[-1].terminal == 0)


def test_clip_norm_caps_each_sample() -> None:
    grad = torch.stack([torch.full(SHAPE, 0.01), torch.full(SHAPE, 10.0)])
    clipped_grad = vgg_flow.clip_norm(grad, 1.0)
    norms = reduce_per_sample(clipped_grad**2, "sum").sqrt()
    assert torch.allclose(clipped_grad[0], grad[0]) and torch.isclose(norms[1], torch.tensor(1.0))


def test_clip_norm_is_the_published_formula_at_small_norms() -> None:
    """At ||g|| = 1e-6 the published g / (||g|| + 1e-8) min(||g||, tau) is 1 % below g min(1, tau/||g||)."""
    grad = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    grad = (
        grad
        / reduce_per_sample(grad**2, "sum").sqrt().reshape(-1, 1, 1)
        * torch.tensor([1e-6, 5.0]).reshape(-1, 1, 1)
    )
    norm = grad.flatten(1).norm(dim=1).reshape(-1, 1, 1)
    published = grad / (norm + 1e-8) * norm.clamp(max=1.0)
    previous = grad * torch.clamp(1.0 / norm, max=1.0)
    ours = vgg_flow.clip_norm(grad, 1.0)
    assert torch.allclose(ours, published, rtol=1e-14, atol=0)
    shrink = 1 - ours[0].norm() / previous[0].norm()
    assert shrink == pytest.approx(1e-8 / (1e-6 + 1e-8), rel=1e-9) and 0.0098 < shrink < 0.0100


def test_a_loss_names_the_fields_its_rows_lack() -> None:
    method = registry.get("tempflow-grpo")
    rows, time = make_rows(method, TinyNet(0).double(), TinyNet(1).double())
    rows = replace(rows, branch_weight=None, f_ref=None)
    with pytest.raises(
        ValueError, match=r"TempFlow-GRPO needs the transition fields \['f_ref', 'branch_weight'\]"
    ):
        method.loss(rows.f_old, rows, method.config)


TEMPFLOW_REWEIGHTS = [
    (objective, reweight)
    for objective in ("ppo", "matching")
    for reweight in ("base", "tempflow", "fair_clip", "fair_clip2", "grpo_guard", "pcpo")
    if (objective, reweight) != ("ppo", "fair_clip2")
]


@pytest.mark.parametrize(("objective", "reweight"), TEMPFLOW_REWEIGHTS)
def test_every_tempflow_reweight_reduces(objective: str, reweight: str, nets) -> None:
    """The redesigns' reweights (fair clipping, fair_clip2) and the published trainer's GRPO-Guard
    and PCPO options reduce like the published tempflow one."""
    base = registry.get("tempflow-grpo")
    method = replace(base, config=replace(base.config, objective=objective, reweight=reweight))
    policy, reference = nets
    rows, time = make_rows(method, policy, reference)
    seen_clipped = False
    for distance in (0.0, *MOVES):
        net = policy if distance == 0.0 else moved(policy, distance)
        errors, active = check(method, net, rows, time)
        assert errors.max() <= TOLERANCE, f"{objective}/{reweight} at {distance}: {errors.tolist()}"
        seen_clipped |= bool((~active).any())
    assert seen_clipped, "the moves must exercise the clipped branch"


def test_fair_clip2_has_no_ratio_form() -> None:
    base = registry.get("tempflow-grpo")
    with pytest.raises(ValueError, match="only for objective 'matching'"):
        replace(base.config, reweight="fair_clip2")


ZETA = 4.3152134639895925  # zo_flow_tempflow spec §8.1


def _mean_d(values: Tensor) -> Tensor:
    return values.flatten(1).mean(1)


def _flow_step_by_hand(kernel, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mu, s, Delta, w) of the Flow-GRPO SDE step as spec §4 writes it, from sigma_i, sigma_i+1, s_i."""
    sigma, delta, s = kernel.point.sigma, kernel.point.sigma - kernel.prev.sigma, kernel.nu
    sigtil2 = s**2 / delta
    c = 1 + sigtil2 * (1 - sigma) / (2 * sigma)
    col = (-1, *([1] * (x.ndim - 1)))
    mu = x * (1 - sigtil2 * delta / (2 * sigma)).reshape(col) - (delta * c).reshape(col) * v
    return mu, s, delta, delta * c / s


@pytest.mark.parametrize("objective", ["ppo", "matching"])
@pytest.mark.parametrize("reweight", ["grpo_guard", "pcpo"])
def test_the_trainer_reweights_are_the_spec_table(objective: str, reweight: str) -> None:
    """Spec §8.1/8.2 written out on SD3.5's SDE steps: rows at every step, moved from the old policy
    by 1e-7 ... 1e-1 so that both clip branches occur; the KL with the heuristic denominator and the
    branch weight k_avg / k_i as in §8.4 and §9."""
    gen = torch.Generator().manual_seed(11)
    grid = grids.sd35_flow_grpo()
    kernel = grid.kernel.select(torch.arange(len(grid)).repeat(2))
    rows_n = kernel.nu.shape[0]
    x, v_old, v_ref, eps = (torch.randn(rows_n, *SHAPE, generator=gen) for _ in range(4))
    moves = torch.logspace(-7, -1, rows_n).reshape(-1, 1, 1)
    v = v_old + moves * torch.randn(rows_n, *SHAPE, generator=gen)
    adv = 3 * torch.randn(rows_n, generator=gen)
    bw = 0.5 + 1.5 * torch.rand(rows_n, generator=gen)
    config = replace(registry.get("tempflow-grpo").config, objective=objective, reweight=reweight)
    rows = Transitions(
        kernel=kernel, x=x, f_old=v_old, f_ref=v_ref, noise=eps, advantage=adv, branch_weight=bw
    )
    native = tempflow_grpo.loss(v, rows, config)

    mean = _mean_d
    mu, s, delta, w = _flow_step_by_hand(kernel, x, v)
    mu_old, _, _, _ = _flow_step_by_hand(kernel, x, v_old)
    mu_ref, _, _, _ = _flow_step_by_hand(kernel, x, v_ref)
    col = (-1, 1, 1)
    x_next = mu_old + s.reshape(col) * eps
    ell = mean(-((x_next - mu) ** 2) + (x_next - mu_old) ** 2) / (2 * s**2)
    a, clip = adv.clamp(-5, 5), 1e-4
    if objective == "ppo":
        if reweight == "grpo_guard":
            kappa, lam = s, 1 / delta
            ell = ell + mean((mu - mu_old) ** 2) / (2 * s**2)
        else:
            kappa, lam = ZETA * delta / w, torch.ones_like(s)
        rho = torch.exp(kappa * ell)
        policy = lam * torch.maximum(-a * rho, -a * rho.clamp(1 - clip, 1 + clip))
    else:
        diff = v - v_old
        if reweight == "grpo_guard":
            m, lam = s * mean(w.reshape(col) * diff * eps), 1 / delta
        else:
            weighted = ZETA * delta.reshape(col) * diff
            m, lam = 0.5 * mean(weighted**2) + mean(weighted * eps), torch.ones_like(s)
        policy = lam * torch.clamp(clip * a.abs() + a * m, min=0)
    kl = mean((mu - mu_ref) ** 2) / (2 * s**2) * delta
    expected = bw * (policy + config.beta * kl)
    torch.testing.assert_close(native.loss, expected, rtol=1e-9, atol=1e-15)
    assert native.active.any() and (~native.active).any()
