"""Latent consistency models (Luo et al. 2023; Song et al. 2023): the student's parametrisation, its training
skeleton and its multistep sampler.

A student maps a noisy latent straight to the clean one: ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred(x_t, t)``,
where ``x0_pred`` is read from the network's output as the schedule's prediction type says (``NoiseSchedule.split``)
and ``c_skip(0) = 1, c_out(0) = 0`` make ``f(x, 0) = x`` (:func:`boundary_scalings`). It is distilled on the
teacher's ``N = skeleton_steps`` DDIM timesteps ``t_n = (n + 1) T / N - 1`` (:func:`skeleton_timesteps`) and sampled
on a subset of them (:class:`ConsistencySampler`).
"""

from __future__ import annotations

from typing import TypeVar

import torch

from ..config import ConsistencyConfig
from .sampler_base import Sampler, StepOutput, trailing_timesteps
from .schedule import NoiseSchedule, eps_from_x0, signal_and_noise


def skeleton_timesteps(train_steps: int, skeleton_steps: int) -> list[int]:
    """The ``skeleton_steps`` training timesteps ``(n + 1) T / N - 1``, ``n = 0..N-1``, ascending (19, 39, ..., 999
    for T = 1000, N = 50): the teacher's DDIM steps a student learns to jump across."""
    if not 1 <= skeleton_steps <= train_steps or train_steps % skeleton_steps:
        raise ValueError(f"skeleton_steps must divide the {train_steps} training timesteps, got {skeleton_steps}")
    stride = train_steps // skeleton_steps
    return [(n + 1) * stride - 1 for n in range(skeleton_steps)]


def jump_steps(skeleton_steps: int, max_steps: int) -> list[tuple[int, int, int]]:
    """``(n, from, to)`` for every step of the sampler's ``n``-step chains, ``n = 1..max_steps``: the indices into
    the ascending skeleton that the step starts from and lands on (``-1``: the chain's end); e.g. ``(4, 19, 14)``
    ... ``(4, 4, -1)`` for 20 skeleton timesteps. What a jump student learns (``training.trajectories``)."""
    pairs = []
    for n in range(1, max_steps + 1):
        indices = trailing_timesteps(skeleton_steps, n)
        pairs += [(n, start, end) for start, end in zip(indices, indices[1:] + [-1], strict=True)]
    return pairs


Timesteps = TypeVar("Timesteps", torch.Tensor, float)


def boundary_scalings(t: Timesteps, config: ConsistencyConfig) -> tuple[Timesteps, Timesteps]:
    """``(c_skip, c_out)`` at training timesteps ``t`` (a tensor ``[N, 1, 1, 1]`` or a number): ``c_skip =
    sigma_data^2 / ((s t)^2 + sigma_data^2)``, ``c_out = s t / sqrt((s t)^2 + sigma_data^2)``, ``s =
    timestep_scaling``; ``(1, 0)`` at ``t = 0``, ``(~0, ~1)`` from the first skeleton timestep on."""
    scaled = config.timestep_scaling * t
    variance = scaled**2 + config.sigma_data**2
    return config.sigma_data**2 / variance, scaled / variance**0.5


def consistency_output(schedule: NoiseSchedule, config: ConsistencyConfig, output: torch.Tensor, x_t: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:
    """The student's ``f(x_t, t) [N, C, H, W]`` from its network ``output`` at ``(x_t [N, C, H, W], t [N])``, without
    a clamp (training: gradients flow through every value)."""
    abar = schedule.abar(t, x_t)
    x0, _ = schedule.split(output, x_t, abar)
    c_skip, c_out = boundary_scalings(t.to(x_t.device, x_t.dtype).view(-1, 1, 1, 1), config)
    return c_skip * x_t + c_out * x0


class ConsistencySampler(Sampler):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; LCM's Alg. 3) in ``1..config.max_steps`` steps.

    ``set_timesteps(n)`` picks ``n`` skeleton timesteps, trailing from ``T - 1`` (``trailing_timesteps`` over the
    skeleton: 999 for n = 1; 999, 759, 499, 239 for n = 4 on T = 1000, N = 50). Step ``i`` maps ``x_{t_i}`` to the
    sample ``x0 = f(x_{t_i}, t_i)`` (``x0_pred`` clamped to ``[-x0_clip, x0_clip]`` first), then, but for the last
    step, noises it to the next timestep: ``x_{t_{i+1}} = sqrt(abar') x0 + sqrt(1 - abar') e``. The noise ``e =
    sqrt(1 - r) eps + sqrt(r) z`` mixes ``eps = (x_{t_i} - sqrt(abar) x0) / sqrt(1 - abar)``, the noise the
    student's sample leaves in ``x_{t_i}``, with ``z``, the row's next draw of its own noise stream (``run_chain``,
    so a row does not depend on its batch), at ``r = config.fresh_noise``: ``r = 1`` is Song et al.'s fresh noise,
    ``r = 0`` a deterministic DDIM step on the student's sample (the range that Zheng et al. 2024's strategic
    stochastic sampling spans).

    A jump student (``config.jumps``) takes the timestep each step lands on as its input too
    (:meth:`landing_timesteps`), and its ``x0`` is the one whose DDIM step (``r = 0``) reaches the teacher's chain
    there. Shapes: ``x, output [N, C, H, W]``; one network row per step and image (the guidance
    scale is the network's input)."""

    def __init__(self, schedule: NoiseSchedule, config: ConsistencyConfig, x0_clip: float | None = None):
        super().__init__(schedule, x0_clip)
        self.config = config
        self.skeleton = skeleton_timesteps(schedule.timesteps, config.skeleton_steps)
        self.stochastic = config.fresh_noise > 0
        self._landing: dict[torch.device, torch.Tensor] = {}

    def set_timesteps(self, n: int) -> None:
        if not 1 <= n <= self.config.max_steps:
            raise ValueError(f"steps must be in 1..{self.config.max_steps} for this student, got {n}")
        self.timesteps = [self.skeleton[k] for k in trailing_timesteps(len(self.skeleton), n)]
        self._landing = {}
        self._reset()

    def landing_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """``int64 [N]``: for each row's timestep ``t [N]`` (one of this chain's), the timestep its step lands on,
        ``-1`` after the last step; a lookup on ``t``'s device, no host sync."""
        if t.device not in self._landing:
            table = torch.full((self.schedule.timesteps,), -1, dtype=torch.long)
            table[self.timesteps[:-1]] = torch.tensor(self.timesteps[1:], dtype=torch.long)
            self._landing[t.device] = table.to(t.device)
        return self._landing[t.device][t.long()]

    def step(self, output, i, x, noise=None):
        t = self.timesteps[i]
        c_skip, c_out = boundary_scalings(float(t), self.config)
        x0 = c_skip * x + c_out * self.predict_x0(output, i, x)
        if i + 1 == len(self.timesteps):
            return StepOutput(x0, x0)
        fresh = self.config.fresh_noise
        left = eps_from_x0(x, x0, self.abar_at(i)) if fresh < 1 else 0.0
        drawn = noise if fresh > 0 else 0.0
        root_a, root_1a = signal_and_noise(self.abar_at(i + 1), x)
        return StepOutput(root_a * x0 + root_1a * ((1 - fresh) ** 0.5 * left + fresh**0.5 * drawn), x0)
