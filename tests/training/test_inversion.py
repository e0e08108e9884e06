"""DDIM inversion against the ideal denoiser of Gaussian data, whose probability-flow ODE is known in closed form:
``x_t / sqrt(a_t s^2 + 1 - a_t)`` stays constant along it (see tests/training/test_samplers.py)."""

from __future__ import annotations

import math

import pytest
import torch

from facegen.model.config import ScheduleConfig
from facegen.model.diffusion.inversion import ddim_invert, inversion_depth
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.diffusion.samplers import DDIMSampler, run_chain
from facegen.model.diffusion.schedule import NoiseSchedule
from tests.training.test_samplers import DATA_STD, SHAPE, ideal_output

STEPS = 50


@pytest.fixture(params=["v", "eps"])
def schedule(request) -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig(prediction=request.param))


def clean_latents() -> torch.Tensor:
    return DATA_STD * torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(7))


def flow_at(schedule: NoiseSchedule, x0: torch.Tensor, abar: float) -> torch.Tensor:
    """Where the exact ODE carries ``x0`` at noise level ``abar``."""
    return x0 * math.sqrt(abar * DATA_STD**2 + 1 - abar) / DATA_STD


@pytest.mark.parametrize("depth", [1, 20, 35])
def test_inversion_follows_the_flow_and_ddim_samples_back_to_the_latent(schedule, depth) -> None:
    sampler = DDIMSampler(schedule)
    sampler.set_timesteps(STEPS)
    x0 = clean_latents()
    model = lambda x, t: ideal_output(schedule, x, t)  # noqa: E731
    reached: dict[int, torch.Tensor] = {}
    inverted = ddim_invert(model, sampler, x0, depth, reached.__setitem__)
    assert list(reached) == list(range(1, depth + 1))
    assert torch.equal(reached[depth], inverted)
    expected = flow_at(schedule, x0, sampler.abar_at(STEPS - depth))  # near the exact flow (DDIM's own error)
    assert torch.allclose(inverted, expected, rtol=5e-2, atol=1e-3)
    back = run_chain(model, sampler, STEPS, ImageNoise([(0, k) for k in range(3)]), SHAPE,
                     start=(STEPS - depth, inverted))
    assert (back - x0).abs().max() < 5e-3 * x0.abs().max()


def test_fixed_point_refinement_makes_the_inversion_exact_where_plain_ddim_inversion_drifts(schedule) -> None:
    sampler = DDIMSampler(schedule)
    sampler.set_timesteps(STEPS)
    x0 = clean_latents()
    model = lambda x, t: ideal_output(schedule, x, t)  # noqa: E731
    errors = []
    for refinements in (0, 1, 2):
        inverted = ddim_invert(model, sampler, x0, 35, refinements=refinements)
        back = run_chain(model, sampler, STEPS, ImageNoise([(0, 0)] * 3), SHAPE, start=(STEPS - 35, inverted))
        errors.append(float((back - x0).abs().max() / x0.abs().max()))
    assert errors[0] > 1e-2 > 5 * errors[1] > 25 * errors[2]


def test_depth_zero_is_the_latent_itself_and_depth_is_bounded(schedule) -> None:
    sampler = DDIMSampler(schedule)
    sampler.set_timesteps(STEPS)
    x0 = clean_latents()
    model = lambda x, t: ideal_output(schedule, x, t)  # noqa: E731
    assert torch.equal(ddim_invert(model, sampler, x0, 0), x0)
    assert torch.equal(run_chain(model, sampler, STEPS, ImageNoise([(0, 0)] * 3), SHAPE, start=(STEPS, x0)), x0)
    with pytest.raises(ValueError, match="depth"):
        ddim_invert(model, sampler, x0, STEPS + 1)


def test_a_wrong_denoiser_does_not_reconstruct(schedule) -> None:
    """The reconstruction above is the inversion's doing: a denoiser that ignores its input loses the latent."""
    sampler = DDIMSampler(schedule)
    sampler.set_timesteps(STEPS)
    x0 = clean_latents()
    constant = lambda x, t: torch.zeros_like(x)  # noqa: E731
    inverted = ddim_invert(constant, sampler, x0, 35)
    back = run_chain(lambda x, t: ideal_output(schedule, x, t), sampler, STEPS, ImageNoise([(0, 0)] * 3), SHAPE,
                     start=(STEPS - 35, inverted))
    assert (back - x0).abs().max() > 0.1 * x0.abs().max()


def test_strength_maps_to_steps() -> None:
    assert [inversion_depth(s, 50) for s in (0.0, 0.3, 0.6, 1.0)] == [0, 15, 30, 50]
