"""No host sync in the sampling loop, with the same numbers as before: noise drawn ahead per (seed, index) stream
gives the same draws whatever the block size, and a step's Python-number coefficients give the bits of tensor
arithmetic."""

from __future__ import annotations

import pytest
import torch

from facegen.model.config import ScheduleConfig
from facegen.model.diffusion import noise as noise_module
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.diffusion.samplers import make_sampler, run_chain
from facegen.model.diffusion.schedule import NoiseSchedule, eps_from_x0

SHAPE = (4, 8, 8)
PAIRS = [(7, 0), (7, 1), (123, 5)]


def test_draws_ahead_are_the_draws_one_at_a_time_and_leave_the_streams_at_the_same_place() -> None:
    one, ahead = ImageNoise(PAIRS), ImageNoise(PAIRS, ahead=4)
    assert one.ahead == 1 and ahead.ahead == 4
    singles = [one.draw(SHAPE) for _ in range(10)]
    blocks = list(ahead.draws(SHAPE, 10))
    assert len(blocks) == 10 and blocks[0].shape == (3, *SHAPE)
    assert all(torch.equal(a, b) for a, b in zip(singles, blocks, strict=True))
    assert torch.equal(one.draw(SHAPE), ahead.draw(SHAPE))  # exactly 10 draws consumed by each
    assert not torch.equal(singles[0], singles[1])


def test_cuda_noise_is_drawn_ahead_by_default() -> None:
    assert ImageNoise(PAIRS, "cuda").ahead == noise_module.DRAWS_AHEAD > 1  # no device touched: only the plan


@pytest.mark.parametrize(("name", "eta"), [("ddpm", 0.0), ("ddim", 0.5), ("dpmpp", 0.0)])
def test_a_chain_draws_noise_in_blocks_and_gives_the_same_result(name: str, eta: float, monkeypatch) -> None:
    schedule = NoiseSchedule(ScheduleConfig())

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a deterministic dummy denoiser
        return torch.tanh(0.7 * x) * (t.float().view(-1, 1, 1, 1) / 1000)

    reference = run_chain(model_fn, make_sampler(name, schedule, 3.0, eta), 10, ImageNoise(PAIRS), SHAPE)
    blocks: list[int] = []
    real_block = ImageNoise._block
    monkeypatch.setattr(ImageNoise, "_block", lambda self, shape, draws: blocks.append(draws) or
                        real_block(self, shape, draws))
    ahead = run_chain(model_fn, make_sampler(name, schedule, 3.0, eta), 10, ImageNoise(PAIRS, ahead=4), SHAPE)
    assert torch.equal(ahead, reference)
    assert blocks == ([4, 4, 2] if name != "dpmpp" else [1])  # x_T + 9 step draws; a deterministic chain: x_T


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_step_coefficients_as_numbers_give_the_bits_of_tensor_arithmetic(prediction: str) -> None:
    schedule = NoiseSchedule(ScheduleConfig(prediction=prediction))
    generator = torch.Generator().manual_seed(0)
    x_t, output = torch.randn(2, *SHAPE, generator=generator), torch.randn(2, *SHAPE, generator=generator)
    for t in (0, 17, 500, 999):
        abar = float(schedule.alphas_cumprod[t])
        as_tensor = torch.tensor(abar, dtype=torch.float32)
        for number, tensor in zip(schedule.split(output, x_t, abar), schedule.split(output, x_t, as_tensor),
                                  strict=True):
            assert torch.equal(number, tensor)
        assert torch.equal(eps_from_x0(x_t, output, abar), eps_from_x0(x_t, output, as_tensor))


def test_the_schedule_goes_to_a_device_once() -> None:
    schedule = NoiseSchedule(ScheduleConfig())
    like = torch.zeros(3, *SHAPE)
    first = schedule.abar(torch.tensor([0, 10, 999]), like)
    cached = schedule._on_device[like.device]
    assert torch.equal(schedule.abar(torch.tensor([0, 10, 999]), like), first)
    assert schedule._on_device[like.device] is cached and first.shape == (3, 1, 1, 1)
