"""The identity instrument: tolerances that separate different faces, kept rates, shifts that move the positions
with the image, a regressor that learns the parameters and is cached like the judge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facegen.model.config import DataConfig
from training.data.celeba import load_split
from training.evaluation.identity import (
    COLUMNS,
    CONTINUOUS,
    IDENTITY,
    TOLERANCE_QUANTILE,
    IdentityRegressor,
    RoundTrip,
    Targets,
    _shifted_targets,
    fit_regressor,
    kept_rates,
    shift,
    split_parameters,
    targets_of,
    tolerances,
    train_regressor,
)


@pytest.fixture(scope="module")
def truth(synth_dir: Path) -> Targets:
    """The true parameters of the tiny folder's train split, at 32x32."""
    return targets_of(split_parameters(synth_dir, "train", 3), DataConfig(image_size=32))


def test_a_tolerance_is_what_a_quarter_of_the_pairs_of_different_faces_stay_within(truth: Targets) -> None:
    tolerance = tolerances(truth)
    assert set(tolerance) == {p.name for p in IDENTITY if not p.categorical} and min(tolerance.values()) > 0
    generator = torch.Generator().manual_seed(1)  # other pairs than the tolerances were measured on
    first = torch.randint(0, len(truth), (4000,), generator=generator)
    second = (first + torch.randint(1, len(truth), (4000,), generator=generator)) % len(truth)
    for name, value in tolerance.items():
        both = truth.shows(name)[first] & truth.shows(name)[second]
        gaps = (truth.value(name)[first[both]] - truth.value(name)[second[both]]).norm(dim=1)
        assert abs(float((gaps <= value).float().mean()) - TOLERANCE_QUANTILE) < 0.08, name


def test_the_same_face_keeps_its_identity_and_another_face_does_not(truth: Targets) -> None:
    tolerance = tolerances(truth)
    same = kept_rates(truth, truth, truth, tolerance)
    assert all(entry["rate"] == 1.0 for entry in same.values())
    assert same["hair_colour"]["n"] == int(truth.shows("hair_colour").sum()) < len(truth)  # bald heads not counted
    others = kept_rates(truth, truth[torch.roll(torch.arange(len(truth)), 1)], truth, tolerance)
    assert others["all"]["rate"] == 0.0 and others["all"]["high"] < 0.05
    assert all(others[name]["rate"] < 0.45 for name in tolerance)
    nudged = Targets(truth.values.clone(), truth.classes, truth.known)
    nudged.values[:, COLUMNS["skin"]] += 2 * tolerance["skin"]  # one parameter moved by twice its tolerance
    moved = kept_rates(truth, nudged, truth, tolerance)
    assert moved["skin"]["rate"] == 0.0 and moved["all"]["rate"] == 0.0 and moved["face_width"]["rate"] == 1.0


def test_a_shift_moves_the_image_and_its_positions_alike(truth: Targets) -> None:
    image = torch.zeros(1, 1, 16, 16)
    image[0, 0, 5, 3] = 1.0  # row 5, column 3
    moved = shift(image, torch.tensor([[2, -1]]))
    assert moved[0, 0, 4, 5] == 1.0 and moved.sum() == 1.0
    offsets = torch.tensor([[2, -1]]).expand(len(truth), 2)
    targets = _shifted_targets(truth, offsets)
    for p in CONTINUOUS:
        change = targets.value(p.name) - truth.value(p.name)
        expected = (2.0 if p.name.endswith("_x") else -1.0) if p.position else 0.0
        assert torch.allclose(change, torch.full_like(change, expected)), p.name


def test_the_regressor_learns_the_parameters(synth_dir: Path, truth: Targets) -> None:
    config = DataConfig(image_size=32)
    images, _ = load_split(synth_dir, "train", config)
    regressor = IdentityRegressor(32)
    regressor.load_state_dict(fit_regressor(images, truth, steps=40, seed=0, batch=16))
    held_out, _ = load_split(synth_dir, "val", config)
    expected = targets_of(split_parameters(synth_dir, "val", 3), config)
    readings = regressor.read(held_out)
    for name in ("skin", "background_top"):
        error = (readings.value(name) - expected.value(name)).norm(dim=1).mean()
        constant = (expected.value(name) - truth.value(name).mean(dim=0)).norm(dim=1).mean()
        assert error < 0.7 * constant, name


def test_a_cached_regressor_is_read_back(synth_dir: Path, tmp_path: Path) -> None:
    config = DataConfig(image_size=32)
    first = train_regressor(synth_dir, config, 3, steps=2, seed=0, cache=tmp_path)
    (path,) = tmp_path.glob("identity-*.pt")
    written = path.stat().st_mtime_ns
    again = train_regressor(synth_dir, config, 3, steps=2, seed=0, cache=tmp_path)
    assert path.stat().st_mtime_ns == written and len(list(tmp_path.iterdir())) == 1
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(),
                                                  strict=True))
    train_regressor(synth_dir, config, 3, steps=3, seed=0, cache=tmp_path)  # other inputs: other weights
    assert len(list(tmp_path.glob("identity-*.pt"))) == 2


def test_a_round_trip_joins_the_training_faces_and_names_the_cached_weights(synth_dir: Path, tmp_path: Path) -> None:
    config = DataConfig(image_size=32)
    given = []

    def darker(faces: torch.Tensor) -> torch.Tensor:
        given.append(faces.clone())
        return faces // 2

    trained = train_regressor(synth_dir, config, 3, steps=2, seed=0, cache=tmp_path, round_trip=RoundTrip("a", darker))
    images, _ = load_split(synth_dir, "train", config)
    assert len(given) == 1 and torch.equal(given[0], images)  # the training faces, each once
    again = train_regressor(synth_dir, config, 3, steps=2, seed=0, cache=tmp_path, round_trip=RoundTrip("a", darker))
    assert len(given) == 1 and all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                                    again.state_dict().values(), strict=True))
    train_regressor(synth_dir, config, 3, steps=2, seed=0, cache=tmp_path, round_trip=RoundTrip("b", darker))
    plain = train_regressor(synth_dir, config, 3, steps=2, seed=0, cache=tmp_path)
    assert len(given) == 2 and len(list(tmp_path.glob("identity-*.pt"))) == 3  # another VAE, or none: other weights
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), plain.state_dict().values(),
                                                     strict=True))
