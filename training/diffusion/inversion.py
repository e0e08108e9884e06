"""DDIM inversion (Song et al. 2021, sec. 4.3; Dhariwal & Nichol 2021, app. F): the deterministic DDIM chain run
backwards, from a clean latent up to a chosen timestep, so that sampling down again from there returns (close to)
the same latent. Editing regenerates from that point under another condition.

With the sampler's timesteps ``t_0 > ... > t_{n-1}`` (level ``n`` = clean, ``abar = 1``), one step goes from level
``j + 1`` to level ``j``: ``x_j = sqrt(abar_j) x0 + sqrt(1 - abar_j) eps``, where ``x0`` and ``eps`` are the
network's predictions at ``(x_{j+1}, t_{j+1})`` (the x0 clamped, and eps made consistent with it, as the DDIM step
does); from the clean level the network is asked at ``t_{n-1}`` and ``x0`` is the clean latent itself. This is the
DDIM update (eq. 12, eta = 0) with the roles of the two levels swapped, exact as the steps become small.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .samplers import DDIMSampler, ModelFn
from .schedule import eps_from_x0, signal_and_noise

InversionCallback = Callable[[int], None]  # called after each inversion step with the number of steps done


def ddim_invert(model_fn: ModelFn, sampler: DDIMSampler, x0: torch.Tensor, depth: int,
                callback: InversionCallback | None = None) -> torch.Tensor:
    """Clean scaled latents ``x0 [N, C, h, w]`` -> the latents at ``t_{n - depth}`` (``n = len(sampler.timesteps)``,
    set by ``sampler.set_timesteps``), from which ``run_chain(..., start=(n - depth, x))`` samples back down.

    ``depth`` in ``0..n``; 0 returns ``x0`` itself. ``model_fn`` is the network (with its condition) as for sampling.
    """
    n = len(sampler.timesteps)
    if not 0 <= depth <= n:
        raise ValueError(f"inversion depth must be in 0..{n}, got {depth}")
    x = x0
    t_rows = torch.tensor(sampler.timesteps, device=x0.device).view(-1, 1).repeat(1, x0.shape[0])  # [n, N]
    for done, level in enumerate(range(n - 1, n - 1 - depth, -1)):  # to level `level` from `level + 1`
        asked = min(level + 1, n - 1)
        output = model_fn(x, t_rows[asked]).float()
        if level + 1 == n:  # from the clean latent: x0 is known, the network gives the direction
            predicted_x0, eps = x, sampler.schedule.split(output, x, sampler.abar_at(asked))[1]
        else:
            predicted_x0 = sampler.predict_x0(output, asked, x)
            eps = eps_from_x0(x, predicted_x0, sampler.abar_at(asked))
        root_a, root_1a = signal_and_noise(sampler.abar_at(level), x)
        x = root_a * predicted_x0 + root_1a * eps
        if callback is not None:
            callback(done + 1)
    return x


def inversion_depth(strength: float, steps: int) -> int:
    """How many of ``steps`` DDIM steps an edit of ``strength`` in [0, 1] inverts (and regenerates): 0 keeps the
    image (the VAE round trip), ``steps`` goes back to pure noise."""
    return round(strength * steps)
