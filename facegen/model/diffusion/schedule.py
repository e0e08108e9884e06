"""The forward process and the meaning of the network's output.

``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` for training timesteps ``t = 0..T-1``. The network
predicts either the noise ``eps`` or the velocity ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (Salimans &
Ho 2022); ``v`` stays well-posed where ``abar_t ~ 0`` (the last cosine timesteps), where recovering ``x_0`` from
``eps`` would divide by ``sqrt(abar_t) ~ 3e-5`` and amplify every error.
"""

from __future__ import annotations

import math

import torch

from ..config import ScheduleConfig


def cosine_alphas_cumprod(timesteps: int, offset: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal (2021) eq. 17: ``abar_t = f(t) / f(0)``, ``f(t) = cos^2(((t/T + s) / (1 + s)) pi/2)``,
    with each beta clipped to 0.999. Returns float64 ``[T]``, index ``t`` = ``abar`` after step ``t + 1``."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


def linear_alphas_cumprod(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Ho et al. (2020): betas linear in t. Returns float64 ``[T]``."""
    return torch.cumprod(1 - torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64), dim=0)


class NoiseSchedule:
    """``alphas_cumprod [T]`` (float64) plus conversions between ``x_0``, ``eps``, ``v`` and ``x_t``."""

    def __init__(self, config: ScheduleConfig):
        if config.prediction not in ("v", "eps"):
            raise ValueError(f"prediction must be 'v' or 'eps', not {config.prediction!r}")
        self.config = config
        self.timesteps = config.timesteps
        self._on_device: dict[torch.device, torch.Tensor] = {}  # alphas_cumprod copied to each device once
        if config.kind == "cosine":
            self.alphas_cumprod = cosine_alphas_cumprod(config.timesteps)
        elif config.kind == "linear":
            self.alphas_cumprod = linear_alphas_cumprod(config.timesteps, config.linear_beta_start,
                                                        config.linear_beta_end)
        else:
            raise ValueError(f"schedule kind must be 'cosine' or 'linear', not {config.kind!r}")

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``abar_t`` for integer timesteps ``t [N]``, shaped ``[N, 1, 1, 1]`` in ``like``'s dtype and device."""
        if like.device not in self._on_device:
            self._on_device[like.device] = self.alphas_cumprod.to(like.device)
        values = self._on_device[like.device][t.long().to(like.device)]
        return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``; ``x0, noise [N, ...]``, ``t [N]``."""
        abar = self.abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at ``(x_0, eps, t)``."""
        if self.config.prediction == "eps":
            return noise
        abar = self.abar(t, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def min_snr_weight(self, t: torch.Tensor, gamma: float, like: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weight (Hang et al. 2023) for the prediction target, ``[N, 1, 1, 1]``.

        With ``SNR_t = abar_t / (1 - abar_t)``, an x0-space error weighted by ``min(SNR_t, gamma)`` is an eps-space
        error weighted by ``min(SNR_t, gamma) / SNR_t`` and a v-space error by ``min(SNR_t, gamma) / (SNR_t + 1)``:
        the nearly clean timesteps stop dominating the gradient. ``gamma <= 0`` gives weight 1 (plain MSE)."""
        if gamma <= 0:
            return torch.ones_like(self.abar(t, like))
        abar = self.abar(t, like)
        snr = abar / (1 - abar)
        return snr.clamp(max=gamma) / (snr if self.config.prediction == "eps" else snr + 1)

    def split(self, output: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor | float
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output at ``x_t`` (with ``abar = abar_t``) -> ``(x0_pred, eps_pred)``.

        v: ``x_0 = sqrt(abar) x_t - sqrt(1-abar) v``, ``eps = sqrt(1-abar) x_t + sqrt(abar) v``;
        eps: ``x_0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)``.
        """
        root_a, root_1a = signal_and_noise(abar, x_t)
        if self.config.prediction == "v":
            return root_a * x_t - root_1a * output, root_1a * x_t + root_a * output
        return (x_t - root_1a * output) / root_a, output


def signal_and_noise(abar: torch.Tensor | float, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """``(sqrt(abar), sqrt(1 - abar))`` in ``like``'s dtype. A float ``abar`` (a sampler's step) is computed on the
    CPU and returned as Python numbers holding those dtype values, so a sampling step sends nothing to the device
    (no host sync) and gives the same bits as 0-d tensor arithmetic on the CPU; a tensor stays on its device."""
    if isinstance(abar, torch.Tensor):
        a = abar.to(like.device, like.dtype)
        return a.sqrt(), (1 - a).sqrt()
    a = torch.tensor(abar, dtype=like.dtype)
    return float(a.sqrt()), float((1 - a).sqrt())


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor | float) -> torch.Tensor:
    """The noise consistent with ``x_t`` and a (clamped) ``x_0``: ``(x_t - sqrt(abar) x_0) / sqrt(1 - abar)``."""
    root_a, root_1a = signal_and_noise(abar, x_t)
    return (x_t - root_a * x0) / root_1a
