"""The latent attribute reader: a small classifier on the diffusion model's scaled latents.

An edit holds the attributes it leaves open at the input's values by following this reader's gradient
(``LatentDiffusion.edit_latents``); it reads latents, not pixels, so no decoder pass enters the sampling loop.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ReaderConfig


class LatentReader(nn.Module):
    """Scaled latents ``[N, C, h, w]`` -> attribute logits ``[N, len(config.attributes)]`` (positive: reads 1)."""

    def __init__(self, config: ReaderConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_channels
        for level, out in enumerate(config.channels):
            if level:
                layers.append(nn.AvgPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(width, out, 3, padding=1), nn.GroupNorm(config.groups, out), nn.SiLU()]
                width = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, len(config.attributes))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(latents))
