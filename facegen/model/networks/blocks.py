"""Building blocks shared by the VAE and the UNet. Tensors are ``[N, C, H, W]`` unless stated."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


class ChannelAttention(nn.Module):
    """Squeeze-excitation: ``x * sigmoid(MLP(mean_hw(x)))``, one gate per channel."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc(x.mean(dim=(2, 3))))
        return x * gate[:, :, None, None]


class SpatialAttention(nn.Module):
    """CBAM-style spatial gate: ``x * sigmoid(conv7x7([mean_c(x), max_c(x)]))``, one gate per pixel."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class ResBlock(nn.Module):
    """Pre-activation residual block; with ``emb_dim`` it adds a projected embedding ``[N, emb_dim]``
    (time + attributes) after the first convolution; with ``attention_reduction`` it gates its residual
    branch with channel then spatial attention."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, emb_dim: int | None = None,
                 dropout: float = 0.0, attention_reduction: int | None = None):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch) if emb_dim else None
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.attention = (nn.Sequential(ChannelAttention(out_ch, attention_reduction), SpatialAttention())
                          if attention_reduction else nn.Identity())
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + self.attention(h)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions (scaled-dot-product kernel), residual."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # [3, N, heads, HW, C/heads], contiguous: with strided q/k/v the CPU falls back to the unfused math kernel
        # (6x slower in bf16 than its flash kernel)
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).permute(1, 0, 2, 4, 3)
        q, k, v = qkv.contiguous().unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v)  # [N, heads, HW, C/heads]
        return x + self.out(attended.transpose(-1, -2).reshape(n, c, h, w))


class Downsample(nn.Module):
    """Stride-2 convolution: ``[N, C, H, W] -> [N, C, H/2, W/2]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 convolution: ``[N, C, H, W] -> [N, C_out, 2H, 2W]`` (``C_out`` defaults
    to ``C``; a smaller one keeps the full-resolution convolution cheap)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
