"""The toy's epsilon-prediction MLP and its training loop (toy spec §2).

Two copies are trained by plain denoising score matching: "base" on samples of p_ref and "ft" on
samples of p* (trained directly on tilted data, not by RL) — the ft model stands in for the optimal
policy in every rollout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from rsm_core.toy.mixture import NUM_TIMESTEPS, UnitMixture, reward_gradient, toy_alphas_cumprod


class ToyDenoiser(nn.Module):
    """x -> Linear(2,256) -> Dropout -> GELU, + time embedding, -> 512 -> 512 -> 2 (toy spec §2)."""

    def __init__(
        self, hidden: int = 256, width: int = 512, dropout: float = 0.2, num_timesteps: int = NUM_TIMESTEPS
    ) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(2, hidden), nn.Dropout(dropout), nn.GELU())
        self.time = nn.Embedding(num_timesteps, hidden)
        self.body = nn.Sequential(
            nn.Linear(hidden, width),
            nn.Dropout(dropout),
            nn.GELU(),
            nn.Linear(width, width),
            nn.Dropout(dropout),
            nn.GELU(),
            nn.Linear(width, 2),
        )

    def forward(self, x: Tensor, timestep: Tensor | int) -> Tensor:
        timestep = torch.as_tensor(timestep, device=x.device).expand(x.shape[0])
        return self.body(self.inp(x) + self.time(timestep))


def train_pair(
    iterations: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: Callable[[str, int, float], None] | None = None,
) -> dict[str, ToyDenoiser]:
    """The "ft" (on p*) and "base" (on p_ref) denoisers, with the same settings and seeds."""
    reference = UnitMixture.reference()
    data = {"ft": reference.tilted(reward_gradient()), "base": reference}
    return {
        name: train_denoiser(
            mixture.sample,
            toy_alphas_cumprod(),
            iterations=iterations,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            progress=(lambda s, loss, n=name: progress(n, s, loss)) if progress else None,
        )
        for name, mixture in data.items()
    }


def train_denoiser(
    sample_data: Callable[[int, torch.Generator], Tensor],
    alphas_cumprod: Tensor,
    *,
    iterations: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
) -> ToyDenoiser:
    """Denoising score matching ||eps_hat(x_t, t) - eps||^2 with t ~ U{0..T-1}, fresh data every step."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks and initialisation
    model = ToyDenoiser()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    abar = alphas_cumprod.to(torch.float32)
    model.train()
    for step in range(iterations):
        x0 = sample_data(batch_size, generator).to(torch.float32)
        t = torch.randint(0, len(abar), (batch_size,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        a = abar[t].unsqueeze(1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = ((model(xt, t) - eps) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, loss.item())
    return model.eval()
