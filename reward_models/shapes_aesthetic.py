"""shapes_aesthetic: the tiny world's analogue of the LAION aesthetic predictor.

A small CNN regresses a quality score in [0, 10] that is 10 for clean renders and drops with the
severity of four degradations (blur, pixel noise, washed-out colour, clutter). Like the LAION
predictor it is learned, differentiable and hackable: it has only seen these corruptions, so a
policy can raise it by going beyond the clean renders it was trained on (e.g. over-saturating).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsm_core.optim import fit

DEGRADATIONS = ("blur", "noise", "washout", "clutter")
MAX_SCORE = 10.0


def _blur(images: Tensor, strength: Tensor, radius: int = 4) -> Tensor:
    """Separable Gaussian blur with per-image sigma = 2 px x strength (reflect padding)."""
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    out = torch.empty_like(images)
    channels = images.shape[1]
    for i, s in enumerate(strength.tolist()):
        kernel = torch.exp(-(offsets**2) / (2 * max(2.0 * s, 1e-3) ** 2))
        kernel = kernel / kernel.sum()
        x = F.pad(images[i : i + 1], (radius, radius, radius, radius), mode="reflect")
        x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        out[i] = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)[0]
    return out


def degrade(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Apply a random subset of the degradations at random strengths; returns (images, target score).

    The target is 10 (1 - total severity / 2), clamped to [0, 10]; a third of the batch stays clean.
    """
    b = images.shape[0]
    severity = torch.rand(b, len(DEGRADATIONS), generator=generator)
    severity = severity * (torch.rand(b, len(DEGRADATIONS), generator=generator) < 0.4)
    severity[torch.rand(b, generator=generator) < 1 / 3] = 0.0
    out = _blur(images, severity[:, 0])
    out = out + 0.25 * severity[:, 1].view(-1, 1, 1, 1) * torch.randn(out.shape, generator=generator)
    grey = out.mean(dim=1, keepdim=True)
    washout = severity[:, 2].view(-1, 1, 1, 1)
    out = (1 - 0.7 * washout) * out + 0.7 * washout * (0.5 * grey + 0.5 * 0.6)
    out = _clutter(out, severity[:, 3], generator)
    target = MAX_SCORE * (1 - severity.sum(1) / 2).clamp(0, 1)
    return out.clamp(0, 1), target


def _clutter(images: Tensor, strength: Tensor, generator: torch.Generator) -> Tensor:
    """Scatter up to 12 small random-coloured specks, their number set by the strength."""
    out = images.clone()
    h, w = images.shape[-2:]
    for i, s in enumerate(strength.tolist()):
        for _ in range(int(round(12 * s))):
            y, x = (torch.randint(0, n - 2, (1,), generator=generator).item() for n in (h, w))
            out[i, :, y : y + 2, x : x + 2] = torch.rand(3, 1, 1, generator=generator)
    return out


class AestheticNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
        )
        self.head = nn.Linear(4 * width, 1)

    def forward(self, images: Tensor) -> Tensor:
        h = self.features(images * 2 - 1)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.head(pooled).squeeze(1)


class ShapesAesthetic:
    name = "shapes_aesthetic"
    differentiable = True

    def __init__(self, net: AestheticNet) -> None:
        self.net = net.requires_grad_(False).eval()

    def __call__(
        self, images: Tensor, prompts: list[str] | None = None, meta: list[dict] | None = None
    ) -> Tensor:
        return self.net(images)


def train_aesthetic(
    clean_batch: Callable[[torch.Generator, int], Tensor],
    steps: int = 1500,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[AestheticNet, float]:
    """Regress the degradation target on freshly rendered clean batches; returns (net, final MSE)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = AestheticNet()

    def step_loss(step: int) -> Tensor:
        images, target = degrade(clean_batch(generator, batch), generator)
        return F.mse_loss(net(images), target)

    loss = fit(net.parameters(), step_loss, steps, lr, progress=progress)
    return net.eval(), loss
