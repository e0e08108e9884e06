"""Reverse-process samplers behind one interface (as diffusers' schedulers):

``sampler.set_timesteps(n)`` picks ``n`` training-scale timesteps ``T-1 = t_0 > t_1 > ... > t_{n-1} >= 0``
("trailing" spacing, so the chain starts from pure noise), then ``sampler.step(output, i, x)`` moves ``x_{t_i}``
to ``x_{t_{i+1}}`` (``x_0`` after the last step) given the network's ``output`` at ``(x_{t_i}, t_i)``, returning
``(prev_sample, pred_x0)``. Every step costs one network evaluation. ``pred_x0`` is clamped to
``[-x0_clip, x0_clip]`` (the range measured on the training latents) before it is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..config import ConsistencyConfig
from .consistency import ConsistencySampler
from .noise import ImageNoise
from .sampler_base import Sampler, StepOutput
from .schedule import NoiseSchedule, eps_from_x0


def trajectory_indices(steps: int, frames: int) -> list[int]:
    """Which step outputs become GIF frames after the leading noise frame: ``min(frames, steps + 1) - 1`` distinct
    step indices spread evenly from the first step to the last (the final sample)."""
    wanted = min(frames, steps + 1) - 1
    if wanted <= 0:
        return []
    if wanted == 1:
        return [steps - 1]
    return sorted({round(k * (steps - 1) / (wanted - 1)) for k in range(wanted)})


class DDIMSampler(Sampler):
    """Song et al. (2021) eq. 12: ``x_prev = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')``; eta = 0 is deterministic."""

    def __init__(self, schedule: NoiseSchedule, x0_clip: float | None = None, eta: float = 0.0):
        super().__init__(schedule, x0_clip)
        self.eta = eta
        self.stochastic = eta > 0

    def step(self, output, i, x, noise=None):
        abar, abar_prev = self.abar_at(i), self.abar_at(i + 1)
        x0 = self.predict_x0(output, i, x)
        eps = eps_from_x0(x, x0, abar)
        sigma = self.eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            prev = prev + sigma * noise
        return StepOutput(prev, x0)


class DDPMSampler(Sampler):
    """Ancestral sampling from the posterior ``q(x_prev | x_t, x_0)`` (Ho et al. 2020 eqs. 6-7), respaced to
    the chosen timesteps (``beta = 1 - abar / abar'``); with all ``T`` steps it is the original method."""

    stochastic = True

    def step(self, output, i, x, noise=None):
        abar, abar_prev = self.abar_at(i), self.abar_at(i + 1)
        x0 = self.predict_x0(output, i, x)
        beta = 1 - abar / abar_prev
        mean = (math.sqrt(abar_prev) * beta / (1 - abar)) * x0 + (math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)) * x
        variance = beta * (1 - abar_prev) / (1 - abar)
        prev = mean + math.sqrt(variance) * noise if variance > 0 else mean
        return StepOutput(prev, x0)


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, with ``lambda = log(alpha / sigma)``:
    ``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D``, ``D = (1 + 1/2r) x0_s - (1/2r) x0_prev``,
    ``r = h_prev / h``; first order on the first step and on the final step to ``sigma = 0`` (where ``x = x0``)."""

    def _reset(self) -> None:
        self._previous: tuple[torch.Tensor, float] | None = None  # (x0 at the previous step, its h)

    def step(self, output, i, x, noise=None):
        abar_s, abar_t = self.abar_at(i), self.abar_at(i + 1)
        x0 = self.predict_x0(output, i, x)
        if abar_t >= 1.0:
            self._previous = None
            return StepOutput(x0, x0)
        alpha_s, sigma_s = math.sqrt(abar_s), math.sqrt(1 - abar_s)
        alpha_t, sigma_t = math.sqrt(abar_t), math.sqrt(1 - abar_t)
        h = math.log(alpha_t / sigma_t) - math.log(alpha_s / sigma_s)
        data = x0
        if self._previous is not None:
            x0_prev, h_prev = self._previous
            r = h_prev / h
            data = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        self._previous = (x0, h)
        prev = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * data
        return StepOutput(prev, x0)


# The sampler of a distilled student (its manifest's ``distillation``): it runs the student's network, one row per
# step with the guidance scale as the network's input, and no other sampler runs a student's network.
STUDENT_SAMPLER = "student"
SAMPLERS: dict[str, type[Sampler]] = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpmpp": DPMSolverPP2MSampler,
                                      STUDENT_SAMPLER: ConsistencySampler}


def make_sampler(name: str, schedule: NoiseSchedule, x0_clip: float | None, ddim_eta: float = 0.0,
                 consistency: ConsistencyConfig | None = None) -> Sampler:
    """The sampler ``name``; ``consistency``: a student's sampling config (its manifest's
    ``distillation.sampling``), which the student sampler needs and the others refuse."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    if (name == STUDENT_SAMPLER) != (consistency is not None):
        raise ValueError(f"the {STUDENT_SAMPLER} sampler, and only it, takes a student's consistency config "
                         f"(sampler {name!r}, config {consistency})")
    if name == STUDENT_SAMPLER:
        return ConsistencySampler(schedule, consistency, x0_clip)
    if name == "ddim":
        return DDIMSampler(schedule, x0_clip, eta=ddim_eta)
    return SAMPLERS[name](schedule, x0_clip)


ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [N, C, H, W], t [N]) -> output
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step index, x_prev, pred_x0)
# (step index, x_prev, pred_x0) -> (x_prev, pred_x0) as the chain goes on with them (e.g. an edit's region mask)
StepConstraint = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def run_chain(model_fn: ModelFn, sampler: Sampler, steps: int, noise: ImageNoise, shape: tuple[int, ...],
              callback: StepCallback | None = None, start: tuple[int, torch.Tensor] | None = None,
              constraint: StepConstraint | None = None) -> torch.Tensor:
    """Run the reverse chain from ``x_T ~ noise.draw(shape)`` and return ``x_0 [N, *shape]``.

    ``start = (i, x)``: begin at step ``i`` from ``x [N, *shape]`` (a latent at ``t_i``, e.g. an inverted image;
    ``i == steps`` returns ``x`` unchanged) instead of from noise; steps keep their indices.

    ``constraint(i, x, pred_x0)`` replaces both after every step (before ``callback``); for single-step samplers
    (DDIM, DDPM) only, whose next step reads nothing but ``x``.
    ``callback(i, x, pred_x0)`` runs after every step (progress, trajectories, cancel by raising). Nothing in the
    loop waits for the device: the timesteps go to the device once, step coefficients are Python numbers, and a
    stochastic sampler's noise (one draw per step but the last) is drawn ahead by ``noise``.
    """
    sampler.set_timesteps(steps)
    stochastic = sampler.stochastic and steps > 1
    draws = noise.draws(shape, steps if stochastic else 1)  # x_T, then the noise of steps 0..n-2
    x = next(draws)
    first = 0
    if start is not None:
        first, x = start
    t_rows = torch.tensor(sampler.timesteps).view(-1, 1).repeat(1, x.shape[0])  # [steps, N] int64
    if x.is_cuda:  # one non-blocking copy from pinned memory: the host never waits for the device
        t_rows = t_rows.pin_memory().to(x.device, non_blocking=True)
    for i in range(first, len(sampler.timesteps)):
        output = model_fn(x, t_rows[i]).float()
        step_noise = next(draws) if stochastic and i + 1 < len(sampler.timesteps) else None
        x, x0 = sampler.step(output, i, x, step_noise)
        if constraint is not None:
            x, x0 = constraint(i, x, x0)
        if callback is not None:
            callback(i, x, x0)
    return x
