"""PatchGAN discriminator: ``[N, 3, H, W]`` in [-1, 1] -> raw logits ``[N, 1, H/8, W/8]`` (no sigmoid; the
losses below take logits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        parts: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for _ in range(layers - 1):
            parts += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.GroupNorm(8, ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        parts.append(nn.Conv2d(ch, 1, 3, 1, 1))
        self.net = nn.Sequential(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]`` on raw logits."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()
