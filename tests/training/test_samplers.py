"""Sampler math against denoisers whose right answers are known in closed form.

For Gaussian data ``x_0 ~ N(0, s^2 I)`` the ideal denoiser is linear, ``E[x_0 | x_t] = sqrt(a) s^2 / (a s^2 + 1 - a) x_t``,
and the probability-flow ODE maps ``x_T`` to ``x_0 = s x_T / sqrt(a_T s^2 + 1 - a_T)``. One test class runs
every sampler through the same contract.
"""

from __future__ import annotations

import math

import pytest
import torch

from facegen.model.config import ScheduleConfig
from facegen.model.diffusion.guidance import guided
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.diffusion.sampler_base import trailing_timesteps
from facegen.model.diffusion.samplers import SAMPLERS, STUDENT_SAMPLER, make_sampler, run_chain
from facegen.model.diffusion.schedule import NoiseSchedule

DATA_STD = 0.5
SHAPE = (2, 4, 4)


def ideal_output(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, data_std: float = DATA_STD) -> torch.Tensor:
    """What a perfect network outputs (v or eps, per the schedule) for Gaussian data of std ``data_std``."""
    a = schedule.abar(t, x_t)
    x0 = a.sqrt() * data_std**2 / (a * data_std**2 + 1 - a) * x_t
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    return a.sqrt() * eps - (1 - a).sqrt() * x0 if schedule.config.prediction == "v" else eps


def ode_solution(schedule: NoiseSchedule, x_T: torch.Tensor, data_std: float = DATA_STD) -> torch.Tensor:
    a_T = float(schedule.alphas_cumprod[-1])
    return data_std * x_T / math.sqrt(a_T * data_std**2 + 1 - a_T)


@pytest.fixture()
def schedule() -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig())


def test_trailing_timesteps_start_at_pure_noise() -> None:
    for n in (1, 2, 7, 20, 1000):
        steps = trailing_timesteps(1000, n)
        assert steps[0] == 999 and len(steps) == n and len(set(steps)) == n
        assert steps == sorted(steps, reverse=True) and steps[-1] >= 0
    assert trailing_timesteps(1000, 1000)[-1] == 0
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="steps must be in 1..1000"):
            trailing_timesteps(1000, bad)


def test_cosine_schedule_ends_near_zero_signal(schedule: NoiseSchedule) -> None:
    abar = schedule.alphas_cumprod
    assert abar[0] > 0.999 and abar[-1] < 1e-6 and bool((abar[1:] < abar[:-1]).all())


def test_v_split_inverts_the_forward_process(schedule: NoiseSchedule) -> None:
    x0, noise = torch.randn(8, *SHAPE), torch.randn(8, *SHAPE)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    x_t = schedule.q_sample(x0, t, noise)
    got_x0, got_eps = schedule.split(schedule.target(x0, noise, t), x_t, schedule.abar(t, x_t))
    assert torch.allclose(got_x0, x0, atol=1e-4) and torch.allclose(got_eps, noise, atol=1e-4)


# the plain samplers; the student's runs a distilled network on its own skeleton (test_distill.py's class)
@pytest.fixture(params=sorted(set(SAMPLERS) - {STUDENT_SAMPLER}))
def sampler_name(request: pytest.FixtureRequest) -> str:
    return request.param


class TestSamplerContract:
    """Every sampler: one network call per step, training-scale t, finite, seed-exact, right distribution."""

    def run(self, schedule, name, steps, n=64, seed=0, model=None):
        sampler = make_sampler(name, schedule, x0_clip=None)
        calls: list[int] = []

        def model_fn(x, t):
            calls.append(int(t[0]))
            return (model or ideal_output)(schedule, x, t)

        noise = ImageNoise([(seed, i) for i in range(n)])
        return run_chain(model_fn, sampler, steps, noise, SHAPE), calls

    def test_one_call_per_step_from_t_max(self, schedule, sampler_name) -> None:
        _, calls = self.run(schedule, sampler_name, 12, n=2)
        assert calls == trailing_timesteps(1000, 12)

    def test_rows_do_not_depend_on_batch(self, schedule, sampler_name) -> None:
        batch, _ = self.run(schedule, sampler_name, 8, n=6, seed=4)
        sampler = make_sampler(sampler_name, schedule, x0_clip=None)
        alone = run_chain(lambda x, t: ideal_output(schedule, x, t), sampler, 8, ImageNoise([(4, 3)]), SHAPE)
        assert torch.allclose(batch[3], alone[0], atol=1e-6)

    def test_sample_spread_matches_the_data(self, schedule, sampler_name) -> None:
        steps = 1000 if sampler_name == "ddpm" else 50
        samples, _ = self.run(schedule, sampler_name, steps, n=400)
        assert torch.isfinite(samples).all()
        assert abs(float(samples.std()) - DATA_STD) < 0.05 * DATA_STD


@pytest.mark.parametrize(("name", "steps", "tolerance"), [("ddim", 250, 0.02), ("dpmpp", 20, 0.02), ("dpmpp", 10, 0.05)])
def test_deterministic_samplers_follow_the_probability_flow_ode(schedule, name, steps, tolerance) -> None:
    noise = ImageNoise([(9, i) for i in range(16)])
    x_T = ImageNoise([(9, i) for i in range(16)]).draw(SHAPE)
    out = run_chain(lambda x, t: ideal_output(schedule, x, t), make_sampler(name, schedule, None), steps, noise, SHAPE)
    expected = ode_solution(schedule, x_T)
    assert float((out - expected).abs().max()) < tolerance * float(expected.abs().max())


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_not(schedule) -> None:
    def sample(eta, seed):
        sampler = make_sampler("ddim", schedule, None, ddim_eta=eta)
        return run_chain(lambda x, t: ideal_output(schedule, x, t), sampler, 10, ImageNoise([(seed, 0)]), SHAPE)

    assert torch.equal(sample(0.0, 1), sample(0.0, 1))
    assert make_sampler("ddim", schedule, None, ddim_eta=1.0).stochastic
    assert not torch.allclose(sample(0.0, 1), sample(1.0, 1))


def test_small_network_error_stays_small_at_the_first_step() -> None:
    """The cosine schedule's last abar is ~1e-9: recovering x0 from an eps prediction there multiplies its error
    by 1/sqrt(abar); the v parameterisation we ship does not. A 1% output error must stay ~1% in x0."""
    x_t = torch.randn(32, *SHAPE)
    t = torch.full((32,), 999)
    error = 0.01 * torch.randn(32, *SHAPE)
    x0_error = {}
    for prediction in ("v", "eps"):
        schedule = NoiseSchedule(ScheduleConfig(prediction=prediction))
        exact = ideal_output(schedule, x_t, t)
        abar = schedule.abar(t, x_t)
        good, _ = schedule.split(exact, x_t, abar)
        noisy, _ = schedule.split(exact + error, x_t, abar)
        x0_error[prediction] = float((noisy - good).abs().max())
    assert x0_error["v"] < 0.05
    assert x0_error["eps"] > 100 * x0_error["v"]
    assert ScheduleConfig().prediction == "v"


def test_few_step_sampling_with_an_imperfect_network_stays_close(schedule) -> None:
    """DPM-Solver++ with 10 steps from t = T-1 and a network off by 2% lands near the exact sample."""
    bias = 0.02 * torch.randn(*SHAPE)

    def model_fn(x, t):
        return ideal_output(schedule, x, t) + bias

    noise_pairs = [(5, i) for i in range(8)]
    clip = 4.0 * DATA_STD
    exact = run_chain(lambda x, t: ideal_output(schedule, x, t), make_sampler("dpmpp", schedule, clip), 10,
                      ImageNoise(noise_pairs), SHAPE)
    rough = run_chain(model_fn, make_sampler("dpmpp", schedule, clip), 10, ImageNoise(noise_pairs), SHAPE)
    assert float((rough - exact).abs().max()) < 0.1


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_guidance_moves_from_the_reference_toward_the_condition(scale: float) -> None:
    """A denoiser that returns its label: guided output = ref + scale * (cond - ref), the reference being the null
    label unless one is given."""
    echo = lambda x, t, labels: labels.view(-1, 1, 1, 1).expand(-1, *x.shape[1:])  # noqa: E731
    x, t = torch.zeros((2, *SHAPE)), torch.zeros(2, dtype=torch.long)
    labels = torch.tensor([[1.0], [0.0]])
    for reference, ref in ((None, torch.tensor([2.0, 2.0])), (torch.tensor([[0.0], [1.0]]), torch.tensor([0.0, 1.0]))):
        out = guided(echo, labels, scale, null_label=2, reference=reference)(x, t)
        expected = ref + scale * (labels.flatten() - ref)
        assert torch.allclose(out[:, 0, 0, 0], expected)

    per_row = torch.tensor([scale, 2.0])  # a scale for each row (the student's teacher step draws one per row)
    out = guided(echo, labels, per_row, null_label=2)(x, t)
    assert torch.allclose(out[:, 0, 0, 0], 2.0 + per_row * (labels.flatten() - 2.0))
