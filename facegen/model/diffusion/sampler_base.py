"""The interface every reverse-process sampler shares (``facegen.model.diffusion.samplers`` describes it): the
base class, its step's output and the trailing timestep spacing. Apart from ``samplers.py`` so that a sampler
defined elsewhere (``consistency.ConsistencySampler``) and the registry of all of them (``samplers.SAMPLERS``) can
both import it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from .schedule import NoiseSchedule


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x at the next (smaller) timestep, [N, C, H, W]
    pred_x0: torch.Tensor  # the clamped x_0 prediction used for the step, [N, C, H, W]


def trailing_timesteps(train_steps: int, n: int) -> list[int]:
    """``n`` distinct timesteps from ``T-1`` down: ``round(T - k T / n) - 1`` for ``k = 0..n-1``."""
    if not 1 <= n <= train_steps:
        raise ValueError(f"steps must be in 1..{train_steps}, got {n}")
    return [int(round(train_steps - k * train_steps / n)) - 1 for k in range(n)]


class Sampler(ABC):
    """Base class: holds the schedule, the chosen timesteps and the x0 clamp."""

    stochastic = False  # whether ``step`` needs fresh noise

    def __init__(self, schedule: NoiseSchedule, x0_clip: float | None = None):
        self.schedule = schedule
        self.x0_clip = x0_clip
        self.timesteps: list[int] = []

    def set_timesteps(self, n: int) -> None:
        self.timesteps = trailing_timesteps(self.schedule.timesteps, n)
        self._reset()

    def _reset(self) -> None:  # noqa: B027 - optional hook: only multistep samplers keep state
        """Clear multistep state between chains."""

    def abar_at(self, i: int) -> float:
        """``abar`` at ``t_i``; ``i == n`` (after the last step) is the clean sample, ``abar = 1``."""
        return 1.0 if i >= len(self.timesteps) else float(self.schedule.alphas_cumprod[self.timesteps[i]])

    def predict_x0(self, output: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        x0, _ = self.schedule.split(output, x, self.abar_at(i))
        return x0.clamp(-self.x0_clip, self.x0_clip) if self.x0_clip else x0

    @abstractmethod
    def step(self, output: torch.Tensor, i: int, x: torch.Tensor, noise: torch.Tensor | None = None) -> StepOutput:
        ...
