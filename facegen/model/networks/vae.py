"""VAE with channel and spatial attention: images ``[N, 3, R, R]`` in [-1, 1] <-> latents ``[N, L, R/f, R/f]``
with ``f = 2 ** (len(channels) - 1)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .blocks import Downsample, ResBlock, SelfAttention, Upsample, group_norm


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.stem = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = cfg.channels[0]
        for level, out_ch in enumerate(cfg.channels):
            for _ in range(cfg.blocks_per_level):
                layers.append(ResBlock(ch, out_ch, cfg.groups, attention_reduction=cfg.attention_reduction))
                ch = out_ch
            if level < len(cfg.channels) - 1:
                layers.append(Downsample(ch))
        layers += [ResBlock(ch, ch, cfg.groups, attention_reduction=cfg.attention_reduction),
                   SelfAttention(ch, 1, cfg.groups)]
        self.body = nn.Sequential(*layers)
        self.norm = group_norm(ch, cfg.groups)
        self.head = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, 3, R, R]`` -> posterior ``(mean, logvar)``, each ``[N, L, R/f, R/f]``."""
        h = self.head(F.silu(self.norm(self.body(self.stem(x)))))
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels[-1]
        self.stem = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(ch, ch, cfg.groups, attention_reduction=cfg.attention_reduction),
                                   SelfAttention(ch, 1, cfg.groups)]
        for level, out_ch in reversed(list(enumerate(cfg.channels))):
            for _ in range(cfg.blocks_per_level + 1):
                layers.append(ResBlock(ch, out_ch, cfg.groups, attention_reduction=cfg.attention_reduction))
                ch = out_ch
            if level > 0:
                layers.append(Upsample(ch, cfg.channels[level - 1]))
                ch = cfg.channels[level - 1]
        self.body = nn.Sequential(*layers)
        self.norm = group_norm(ch, cfg.groups)
        self.head = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z [N, L, R/f, R/f]`` (unscaled VAE latent) -> image ``[N, 3, R, R]``, roughly in [-1, 1]."""
        return self.head(F.silu(self.norm(self.body(self.stem(z)))))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.config.channels) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction ``[N, 3, R, R]`` through a reparameterised latent sample, plus ``(mean, logvar)``."""
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return self.decode(z), mean, logvar


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) averaged over every latent element: ``0.5 * mean(mu^2 + var - 1 - logvar)``."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
