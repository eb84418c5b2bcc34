"""Training rows: one reverse transition x_t -> x_t' with everything a loss needs about it.

A rollout (or a test) fills the fields its method uses; a method asks for them with ``require`` so a
missing field is an error that names it instead of an AttributeError deep inside a loss. Every
tensor is detached data: the only quantity with a gradient is the native output of theta, which
losses take as a separate argument. The function-valued fields let a loss run networks itself:
``lookahead_reward`` (a reparameterised method differentiates the reward of the next state it
produces) and the fields of the unpruned first-order algorithms, which train an auxiliary network
with finite differences and input Jacobians of the policy, the reference and the reward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from rsm_core.kernels import Kernel

# (x, time (B,)) -> a latent-shaped network output at that backbone time, differentiable in x
FieldFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Transitions:
    """A batch of B transitions; ``kernel`` has per-sample (B,) or shared 0-d coefficients."""

    kernel: Kernel
    x: Tensor  # x_t, (B, *D)
    f_old: Tensor  # native output of the sampling policy at x_t (the trust-region anchor)
    f_ref: Tensor | None = None  # native output of the frozen reference (adapter disabled)
    noise: Tensor | None = None  # the step's standard-normal draw (x_t' = mean_old + nu noise)
    advantage: Tensor | None = None  # (B,)
    reward: Tensor | None = None  # (B,) terminal reward
    reward_grad: Tensor | None = None  # (B, *D) the reward-gradient signal of a first-order method
    steps_remaining: Tensor | None = None  # (B,) sampler steps after this one
    branch_weight: Tensor | None = None  # (B,) k_avg / k_i of a branching rollout
    # x_t' -> r(x0_hat(x_t')) through a frozen denoiser, differentiable in its input (SQDF's lookahead)
    lookahead_reward: Callable[[Tensor], Tensor] | None = None
    # --- for losses that run networks themselves (the unpruned VGG-Flow and nabla-DB) ---
    time: Tensor | None = None  # (B,) the backbone time of x_t, as the fields below take it
    time_next: Tensor | None = None  # (B,) the backbone time of x_t'
    policy_field: FieldFn | None = None  # the policy's native output (its training CFG)
    reference_field: FieldFn | None = None  # the frozen reference's
    aux_field: FieldFn | None = None  # the method's auxiliary network (value or residual net), with its graph
    sample_reward: Callable[[Tensor], Tensor] | None = (
        None  # clean latents -> rewards, decoder and prompts bound
    )

    def require(self, *names: str, method: str) -> None:
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            known = ", ".join(f.name for f in fields(self))
            raise ValueError(
                f"{method} needs the transition fields {missing}, which this batch does not carry; "
                f"fill them when building Transitions (fields: {known})"
            )

    @property
    def elements(self) -> int:
        """d, the number of latent elements per sample (the denominator of per-element means)."""
        return self.x[0].numel()

    def ratio_deviation(self, f_theta: Tensor) -> Tensor:
        """Per row |rho - 1| of the stored draw, rho = p_theta(x_t') / p_old(x_t') with each
        log-density averaged over the elements (as Flow-GRPO logs it). On the first microbatch of an
        epoch the policy is the sampling policy, so anything but 0 is numerical mismatch."""
        self.require("noise", method="ratio_deviation")
        x_next = self.x_next
        log_ratio = self.kernel.log_prob(x_next, self.x, f_theta.detach(), "mean") - self.kernel.log_prob(
            x_next, self.x, self.f_old, "mean"
        )
        return (torch.exp(log_ratio.double()) - 1).abs()

    @property
    def x_next(self) -> Tensor:
        """x_t' as the sampling policy produced it (its mean plus nu times the stored noise)."""
        if self.noise is None:
            return self.kernel.mean(self.x, self.f_old)
        return self.kernel.sample(self.x, self.f_old, self.noise)
