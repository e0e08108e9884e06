"""DDIM inversion (Song et al. 2021, sec. 4.3): the deterministic DDIM chain run backwards, from a clean latent up to
a chosen timestep, so that sampling down again from there returns the same latent. Editing regenerates from that
point under another condition.

With the sampler's timesteps ``t_0 > ... > t_{n-1}`` (level ``n`` = clean, ``abar = 1``), the DDIM step (eq. 12,
eta = 0) from level ``j`` to ``j + 1`` is ``x_{j+1} = sqrt(abar_{j+1}) x0(x_j) + sqrt(1 - abar_{j+1}) eps(x_j)``,
with the network's predictions at ``(x_j, t_j)`` (x0 clamped, eps consistent with it). Inverting a step means
solving it for ``x_j``. Given ``eps``, ``x_j = sqrt(abar_j) (x_{j+1} - sqrt(1 - abar_{j+1}) eps) / sqrt(abar_{j+1})
+ sqrt(1 - abar_j) eps``; ``eps`` depends on ``x_j`` itself, so it is first taken at ``(x_{j+1}, t_j)`` (the usual
DDIM inversion) and then re-evaluated at the new ``x_j`` ``refinements`` times (a fixed-point iteration, one network
call each), which makes the inversion the exact inverse of the sampling step as it converges.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .samplers import DDIMSampler, ModelFn
from .schedule import eps_from_x0, signal_and_noise

# called after each inversion step with the number of steps done and the latents reached (at ``t_{n - done}``)
InversionCallback = Callable[[int, torch.Tensor], None]
# Fixed-point refinements per inversion step: 1 brings the ideal-denoiser round trip from ~4% to ~0.3% error
# (tests/training/test_inversion.py) for one more network call per step.
DEFAULT_REFINEMENTS = 1


def ddim_invert(model_fn: ModelFn, sampler: DDIMSampler, x0: torch.Tensor, depth: int,
                callback: InversionCallback | None = None, refinements: int = DEFAULT_REFINEMENTS) -> torch.Tensor:
    """Clean scaled latents ``x0 [N, C, h, w]`` -> the latents at ``t_{n - depth}`` (``n = len(sampler.timesteps)``,
    set by ``sampler.set_timesteps``), from which ``run_chain(..., start=(n - depth, x))`` samples back down.

    ``depth`` in ``0..n``; 0 returns ``x0`` itself. ``model_fn`` is the network (with its condition) as for sampling.
    """
    n = len(sampler.timesteps)
    if not 0 <= depth <= n:
        raise ValueError(f"inversion depth must be in 0..{n}, got {depth}")
    x = x0
    t_rows = torch.tensor(sampler.timesteps, device=x0.device).view(-1, 1).repeat(1, x0.shape[0])  # [n, N]
    for done, level in enumerate(range(n - 1, n - 1 - depth, -1)):  # solve the step level -> level + 1 for x_level
        target = x
        root_a, root_1a = signal_and_noise(sampler.abar_at(level), x)
        root_next, root_1next = signal_and_noise(sampler.abar_at(level + 1), x)
        for _ in range(1 + refinements):
            predicted_x0 = sampler.predict_x0(model_fn(x, t_rows[level]).float(), level, x)
            eps = eps_from_x0(x, predicted_x0, sampler.abar_at(level))
            x = root_a * (target - root_1next * eps) / root_next + root_1a * eps
        if callback is not None:
            callback(done + 1, x)
    return x


def inversion_depth(strength: float, steps: int) -> int:
    """How many of ``steps`` DDIM steps an edit of ``strength`` in [0, 1] inverts (and regenerates): 0 keeps the
    image (the VAE round trip), ``steps`` goes back to pure noise."""
    return round(strength * steps)
