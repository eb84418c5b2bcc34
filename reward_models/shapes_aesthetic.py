"""shapes_aesthetic: the tiny world's analogue of the LAION aesthetic predictor.

A small CNN regresses a quality score in [0, 10] that is 10 for clean renders and drops with the
severity of three appearance degradations (pixel noise, blur, washed-out colour). Like the LAION
predictor it is learned, differentiable and hackable: it has only seen these corruptions, so a
policy can raise it by going beyond the clean renders it was trained on (e.g. over-saturating).

It judges appearance, not content: its receptive field is 7 px and its features are pooled over the
image (mean and max), so which objects are drawn where barely moves it, while the grain and softness
that the last, high-SNR sampling steps leave behind do. That makes it the world's high-SNR reward, as
the aesthetic score is in the paper, against the semantic shapes_geneval.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsm_core.optim import fit

DEGRADATIONS = ("blur", "noise", "washout")
MAX_BLUR_SIGMA = 1.5  # px at full severity: softness, not a change of shape
MAX_NOISE_STD = 0.2  # at full severity; a last-step SDE branch leaves about 0.1
MAX_SCORE = 10.0


def _blur(images: Tensor, strength: Tensor, radius: int = 4) -> Tensor:
    """Separable Gaussian blur with per-image sigma = MAX_BLUR_SIGMA x strength (reflect padding)."""
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    out = torch.empty_like(images)
    channels = images.shape[1]
    for i, s in enumerate(strength.tolist()):
        kernel = torch.exp(-(offsets**2) / (2 * max(MAX_BLUR_SIGMA * s, 1e-3) ** 2))
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
    out = out + MAX_NOISE_STD * severity[:, 1].view(-1, 1, 1, 1) * torch.randn(out.shape, generator=generator)
    grey = out.mean(dim=1, keepdim=True)
    washout = severity[:, 2].view(-1, 1, 1, 1)
    out = (1 - 0.7 * washout) * out + 0.7 * washout * (0.5 * grey + 0.5 * 0.6)
    target = MAX_SCORE * (1 - severity.sum(1) / 2).clamp(0, 1)
    return out.clamp(0, 1), target


class AestheticNet(nn.Module):
    """Three 3x3 convolutions (7 px receptive field), then mean and max over the image: a texture judge.
    The max keeps it sensitive to where the grain falls, not only to how much there is."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.SiLU(),
        )
        self.head = nn.Linear(4 * width, 1)

    def forward(self, images: Tensor) -> Tensor:
        h = self.features(images * 2 - 1)
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)).squeeze(1)


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
