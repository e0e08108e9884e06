"""Class-conditional denoising UNet for VAE latents.

``UNet(x_t [N, C, H, W], t [N] (training-scale timesteps 0..T-1, float or int), labels [N, A])`` returns a
tensor shaped like ``x_t``; what it means (noise or velocity) is the diffusion code's business. ``labels`` holds,
per attribute, 0 (absent), 1 (present) or ``config.null_label`` (not given: the unconditional branch of
classifier-free guidance); as floats, values between 0 and 1 blend the two (:class:`AttributeEmbedding`).

A distilled student (``config.guidance_embedding``) also takes ``guidance [N]``, the classifier-free guidance scale
``w`` it folds in (one row per image instead of two): ``sinusoid(GUIDANCE_EMBEDDING_SCALE * w)`` through an MLP whose
last layer starts at zero is added to the time embedding, so a student made from a teacher's weights starts as the
teacher's conditional branch, whatever ``w``.

A jump student (``config.target_embedding``) also takes ``target [N]``, the timestep its sampler's step lands on
(``-1``: the chain's end), embedded as the timestep ``target + 1`` through another MLP whose last layer starts at zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..config import UNetConfig
from .blocks import Downsample, ResBlock, SelfAttention, Upsample, group_norm

# w is embedded as a timestep of GUIDANCE_EMBEDDING_SCALE * w: w in [0, ~15] then spans the range of training timesteps
# the sinusoid's frequencies resolve (LCM's guidance embedding, Luo et al. 2023)
GUIDANCE_EMBEDDING_SCALE = 1000.0


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` of timesteps ``t [N]``: ``[cos(t w_k), sin(t w_k)]``,
    ``w_k = max_period^(-k / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class AttributeEmbedding(nn.Module):
    """Sum over attributes of a learned vector per value (0, 1 or null): ``labels [N, A] -> [N, dim]``.

    Floating-point labels may lie between two values: ``v = k + w`` (``0 <= w < 1``) embeds as
    ``(1 - w) e_k + w e_(k+1)``, e.g. 0.25 is a quarter of the way from "absent" to "present" (attribute
    transitions); integral values give exactly the vectors of integer labels."""

    def __init__(self, num_attributes: int, null_label: int, dim: int):
        super().__init__()
        self.values = null_label + 1
        self.table = nn.Embedding(num_attributes * self.values, dim)
        self.register_buffer("offsets", torch.arange(num_attributes) * self.values, persistent=False)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if not labels.is_floating_point():
            return self.table(labels.long() + self.offsets).sum(dim=1)
        low = labels.floor()
        below = self.table(low.long() + self.offsets)  # [N, A, dim]
        above = self.table(labels.ceil().long() + self.offsets)
        weight = (labels - low).unsqueeze(-1).to(below.dtype)  # 0 for integral labels: ``below`` exactly
        return (below + weight * (above - below)).sum(dim=1)


EMBEDDING_TABLE = "label_embedding.table.weight"  # the state-dict entry of AttributeEmbedding's vectors


def grown_attribute_table(table: torch.Tensor, parent: Sequence[str], child: Sequence[str], null_label: int,
                          generator: torch.Generator) -> torch.Tensor:
    """A parent's embedding table ``[len(parent) * (null_label + 1), dim]`` laid out for the ``child``'s attributes.

    Each attribute the parent knew keeps its vectors. A new one gets a zero null vector, so that every label leaving
    it open acts exactly as the parent's did, and value vectors drawn like a fresh embedding's (standard normal,
    from ``generator``): a zero start would leave them to grow by about the learning rate per step under Adam, far
    too slowly to reach the scale of the others (measured: norm 0.1 against 16 after 2200 steps, and a model that
    drew no difference between the values). Raises ``ValueError`` when the child drops an attribute."""
    missing = [name for name in parent if name not in child]
    if missing:
        raise ValueError(f"the parent is conditioned on {missing}, which the child's attributes {list(child)} lack")
    values = null_label + 1
    grown = table.new_zeros(len(child) * values, table.shape[1])
    for i, name in enumerate(child):
        start = i * values
        if name in parent:
            k = list(parent).index(name)
            grown[start:start + values] = table[k * values:(k + 1) * values]
        else:  # the value vectors; the null vector (the last) stays zero
            grown[start:start + null_label] = torch.randn(null_label, table.shape[1], generator=generator)
    return grown


def narrowed_attribute_table(table: torch.Tensor, parent: Sequence[str], child: Sequence[str], null_label: int
                             ) -> torch.Tensor:
    """A parent's embedding table laid out for ``child``, a subset of its attributes: the model conditioned on the
    child's attributes alone that computes exactly what the parent computes with the others left open (their null
    vectors, a constant of every such label's embedding sum, are folded into each vector of the child's first
    attribute). Raises ``ValueError`` when the child names an attribute the parent lacks, or none."""
    unknown = [name for name in child if name not in parent]
    if unknown or not child:
        raise ValueError(f"the child's attributes {list(child)} must be some of the parent's {list(parent)}")
    values = null_label + 1
    rows = [table[k * values:(k + 1) * values].float() for k in range(len(parent))]  # summed in float32
    kept = [rows[list(parent).index(name)].clone() for name in child]
    for k, name in enumerate(parent):
        if name not in child:
            kept[0] += rows[k][null_label]
    return torch.cat(kept).to(table.dtype)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        base, emb_dim = cfg.base_channels, 4 * cfg.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embedding = AttributeEmbedding(cfg.num_attributes, cfg.null_label, emb_dim)
        self.stem = nn.Conv2d(cfg.in_channels, base, 3, padding=1)

        def block(in_ch: int, out_ch: int, level: int) -> nn.ModuleList:
            parts = [ResBlock(in_ch, out_ch, cfg.groups, emb_dim, cfg.dropout)]
            if level in cfg.attention_levels:
                parts.append(SelfAttention(out_ch, cfg.heads, cfg.groups))
            return nn.ModuleList(parts)

        self.down = nn.ModuleList()
        skip_channels = [base]
        ch = base
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.blocks_per_level):
                self.down.append(block(ch, base * mult, level))
                ch = base * mult
                skip_channels.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)
        self.middle = nn.ModuleList([ResBlock(ch, ch, cfg.groups, emb_dim, cfg.dropout),
                                     SelfAttention(ch, cfg.heads, cfg.groups),
                                     ResBlock(ch, ch, cfg.groups, emb_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.blocks_per_level + 1):
                self.up.append(block(ch + skip_channels.pop(), base * mult, level))
                ch = base * mult
                if level > 0 and i == cfg.blocks_per_level:
                    self.up[-1].append(Upsample(ch))
        self.out = nn.Sequential(group_norm(ch, cfg.groups), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.guidance_mlp: nn.Sequential | None = None
        if cfg.guidance_embedding:
            self.guidance_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.guidance_mlp[-1].weight)
            nn.init.zeros_(self.guidance_mlp[-1].bias)
        self.target_mlp: nn.Sequential | None = None
        if cfg.target_embedding:
            self.target_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.target_mlp[-1].weight)
            nn.init.zeros_(self.target_mlp[-1].bias)

    @staticmethod
    def _run(parts: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for part in parts:
            h = part(h, emb) if isinstance(part, ResBlock) else part(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                guidance: torch.Tensor | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
        """``guidance [N]``: the guidance scale of each row, required by a student, refused by a plain model.
        ``target [N]``: the timestep each row's step lands on (-1: the end), required by a jump student alone."""
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(x.dtype)) + self.label_embedding(labels)
        if (guidance is None) != (self.guidance_mlp is None):
            raise ValueError("a student UNet (guidance_embedding) takes the guidance scale w [N] as `guidance`; a "
                             "plain one takes none")
        if self.guidance_mlp is not None:
            w = timestep_embedding(GUIDANCE_EMBEDDING_SCALE * guidance, self.config.base_channels)
            emb = emb + self.guidance_mlp(w.to(x.dtype))
        if (target is None) != (self.target_mlp is None):
            raise ValueError("a jump student UNet (target_embedding) takes the timestep its step lands on as `target`; "
                             "no other takes one")
        if self.target_mlp is not None:
            emb = emb + self.target_mlp(timestep_embedding(target + 1, self.config.base_channels).to(x.dtype))
        h = self.stem(x)
        skips = [h]
        for parts in self.down:
            h = self._run(parts, h, emb)
            skips.append(h)
        h = self._run(self.middle, h, emb)
        for parts in self.up:
            h = self._run(parts, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
