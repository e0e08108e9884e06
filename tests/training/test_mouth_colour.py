"""Colour fidelity of the mouth on real synthetic faces: tinting mouths or teeth cyan or green puts them outside
the real mouths' colours, ordinary blur and noise do not, and about 1% of real mouths are outside by construction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from facegen.model.config import DataConfig
from training.data.celeba import load_split
from training.evaluation.identity import mouth_geometry, split_parameters, targets_of
from training.evaluation.judge import blurred
from training.evaluation.mouth_colour import MouthColour, mouth_masks, surprisal

CYAN, GREEN = (120, 230, 210), (110, 215, 120)


@pytest.fixture(scope="module")
def mouths(synth_dir: Path) -> dict[bool, dict[str, torch.Tensor]]:
    """Every face of the tiny folder by Smiling: ``images``, the mouths' true ``geometry`` and whether the smile is
    ``open`` (teeth), each split in ``reference``, ``calibration`` and ``test`` thirds (one face in two, then one of
    the rest in two)."""
    config = DataConfig(attributes=("Smiling",), image_size=64)
    images, labels, parameters = [], [], []
    for split in ("train", "val", "test"):
        split_images, split_labels = load_split(synth_dir, split, config)
        images.append(split_images)
        labels.append(split_labels[:, 0])
        parameters += split_parameters(synth_dir, split, 3)
    geometry = mouth_geometry(targets_of(parameters, config))
    opened = torch.tensor([p.mouth.open for p in parameters])
    all_images, all_labels = torch.cat(images), torch.cat(labels)
    sets = {}
    for value in (True, False):
        rows = (all_labels == int(value)).nonzero().flatten()
        parts = {"reference": rows[0::2], "calibration": rows[1::2][0::2], "test": rows[1::2][1::2]}
        sets[value] = {f"{part}_{what}": data[index] for part, index in parts.items()
                       for what, data in (("images", all_images), ("geometry", geometry), ("open", opened))}
        sets[value]["colour"] = MouthColour.fit(sets[value]["reference_images"], sets[value]["reference_geometry"],
                                                sets[value]["calibration_images"],
                                                sets[value]["calibration_geometry"])
    return sets


def tint(images: torch.Tensor, where: torch.Tensor, colour: tuple[int, int, int], amount: float) -> torch.Tensor:
    """``images uint8 [N, 3, S, S]`` blended toward ``colour`` by ``amount`` at ``where bool [N, 1, S, S]``."""
    target = torch.tensor(colour, dtype=torch.float32)[None, :, None, None]
    return torch.where(where, ((1 - amount) * images.float() + amount * target).round().to(torch.uint8), images)


def outside_count(mouths: dict[bool, dict[str, torch.Tensor]], change=lambda images, geometry: images) -> int:
    """How many test faces of both labels are outside their label's real mouth colours after ``change``."""
    return sum(int(s["colour"].outside(change(s["test_images"], s["test_geometry"]), s["test_geometry"]).sum())
               for s in mouths.values())


def test_tinted_mouths_are_outside_and_real_ones_are_not(mouths: dict[bool, dict[str, torch.Tensor]]) -> None:
    faces = sum(len(s["test_images"]) for s in mouths.values())
    real = outside_count(mouths)
    assert real <= 0.1 * faces
    for colour in (CYAN, GREEN):
        tinted = outside_count(mouths, lambda images, geometry, c=colour: tint(
            images, mouth_masks(geometry, images.shape[-1])[:, None], c, 0.4))
        assert tinted >= 0.66 * faces and tinted >= real + 10, colour


def test_tinted_teeth_put_a_calibration_mouth_outside(mouths: dict[bool, dict[str, torch.Tensor]]) -> None:
    smiles = mouths[True]
    opened = smiles["calibration_open"]
    images, geometry = smiles["calibration_images"][opened], smiles["calibration_geometry"][opened]
    assert len(images) >= 5 and not smiles["colour"].outside(images, geometry).any()  # inside by construction
    pixels = images.float()
    teeth = ((pixels.min(dim=1, keepdim=True).values > 200)
             & (pixels.max(dim=1, keepdim=True).values - pixels.min(dim=1, keepdim=True).values < 40)
             & mouth_masks(geometry, images.shape[-1])[:, None])
    assert teeth.flatten(1).any(dim=1).all()  # every open smile shows its teeth
    for colour in (CYAN, GREEN):
        outside = smiles["colour"].outside(tint(images, teeth, colour, 0.5), geometry)
        assert outside.float().mean() >= 0.7, colour


def test_blur_and_noise_do_not_move_real_mouths_outside(mouths: dict[bool, dict[str, torch.Tensor]]) -> None:
    real = outside_count(mouths)
    noise = torch.Generator().manual_seed(0)
    assert outside_count(mouths, lambda images, geometry: blurred(images)) <= real + 1
    assert outside_count(mouths, lambda images, geometry: blurred(images, 2.0)) <= real + 1
    assert outside_count(mouths, lambda images, geometry: (images.float() + 6 * torch.randn(
        images.shape, generator=noise)).clamp(0, 255).round().to(torch.uint8)) <= real + 1


def test_colours_no_real_mouth_shows_are_the_most_surprising() -> None:
    counts = torch.zeros(16**3)
    counts[0] = counts[1] = 50  # two neighbouring cells hold every real pixel
    values = surprisal(counts)
    assert values[0] == values[1] == values.min()
    assert values[2] > values[1] and values[-1] == values.max() == 8  # far away: the floor of 1e-8
