"""Rates with intervals and KID: the instruments of ``python -m training evaluate``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.evaluation.metrics import frechet_distance, kid
from training.stats import wilson_interval


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


def test_frechet_distance_matches_the_closed_form_of_commuting_covariances() -> None:
    """Covariances with one eigenbasis: the distance is |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(5)
    basis = np.linalg.qr(rng.normal(size=(48, 48)))[0]
    a, b = rng.uniform(0.1, 4, size=48), rng.uniform(0.1, 4, size=48)
    mu_a, mu_b = rng.normal(size=48), rng.normal(size=48)
    expected = np.square(mu_a - mu_b).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    got = frechet_distance(mu_a, (basis * a) @ basis.T, mu_b, (basis * b) @ basis.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_agrees_with_the_general_matrix_root_and_is_zero_for_one_set() -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(300, 40)), rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40)) * 0.3 + 0.2
    (mu_x, mu_y), (s_x, s_y) = (x.mean(0), y.mean(0)), (np.cov(x, rowvar=False), np.cov(y, rowvar=False))
    root = scipy_linalg.sqrtm(s_x @ s_y).real
    reference = np.square(mu_x - mu_y).sum() + np.trace(s_x) + np.trace(s_y) - 2 * np.trace(root)
    assert frechet_distance(mu_x, s_x, mu_y, s_y) == pytest.approx(reference, rel=1e-6)
    few = rng.normal(size=(30, 64))  # fewer samples than dimensions: a singular covariance
    s_few = np.cov(few, rowvar=False)
    assert abs(frechet_distance(few.mean(0), s_few, few.mean(0), s_few)) < 1e-6 * np.trace(s_few)
