"""Rates with intervals and KID: the instruments of ``python -m training evaluate``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import kid, wilson_interval


@pytest.mark.parametrize(("rate", "n"), [(0.5, 40), (0.9, 200), (0.97, 500)])
def test_wilson_interval_covers_the_true_rate_about_95_percent_of_the_time(rate: float, n: int) -> None:
    rng = np.random.default_rng(7)
    trials = 4000
    covered = 0
    for successes in rng.binomial(n, rate, size=trials):
        low, high = wilson_interval(int(successes), n)
        covered += low <= rate <= high
    assert 0.93 <= covered / trials <= 0.975  # nominal 95%; Wilson's coverage stays close to it at these n


def test_wilson_interval_stays_inside_zero_one_and_is_undefined_without_trials() -> None:
    assert wilson_interval(0, 20)[0] == 0.0 and 0 < wilson_interval(0, 20)[1] < 0.2
    assert wilson_interval(20, 20)[1] == 1.0 and 0.8 < wilson_interval(20, 20)[0] < 1
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_kid_of_a_set_against_itself_is_near_zero_and_a_shifted_set_is_far() -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(400, 64))
    same = rng.normal(size=(400, 64))
    shifted = rng.normal(loc=0.3, size=(400, 64))
    kid_same, std_same = kid(reference, same, subsets=20, subset_size=200)
    kid_shift, _ = kid(reference, shifted, subsets=20, subset_size=200)
    assert abs(kid_same) < 3 * std_same + 1e-3  # unbiased: zero within its own spread
    assert kid_shift > 20 * max(abs(kid_same), std_same)


def test_kid_needs_two_images() -> None:
    with pytest.raises(ValueError, match="at least two"):
        kid(np.zeros((1, 4)), np.zeros((5, 4)))
