"""The edit on the tiny model: strength 0 is the VAE round trip, each phase runs under the chosen reference label,
a region edit leaves the rest of the face as it was, every row of the evaluation is scored with intervals, tuning
never sees the reported faces."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from facegen.model.config import EDIT_REGIONS
from facegen.model.diffusion.inversion import DEFAULT_REFINEMENTS
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.diffusion.schedule import NoiseSchedule
from facegen.model.imaging import to_float, to_uint8
from facegen.model.networks.unet import UNet
from facegen.model.pipeline import LatentDiffusion
from facegen.model.regions import edit_mask
from training.data.celeba import load_split
from training.evaluation.evaluate_edit import edit_images, evaluate_edits, held_out_faces, markdown_report


def test_strength_zero_is_the_vae_round_trip_and_a_deep_edit_changes_the_face(tiny_checkpoints: Path,
                                                                            synth_dir: Path) -> None:
    model = LatentDiffusion.load(tiny_checkpoints, "latest", torch.device("cpu"), torch.float32)
    faces, _ = load_split(synth_dir, "test", model.manifest.data)
    faces = faces[:3]
    round_trip = to_uint8(model.decode(model.encode(to_float(faces))))
    assert torch.equal(edit_images(model, faces, {"Smiling": True}, 0.0, steps=4, guidance_scale=2.0), round_trip)
    deep = edit_images(model, faces, {"Smiling": True}, 1.0, steps=4, guidance_scale=2.0)
    assert deep.shape == faces.shape and not torch.equal(deep, round_trip)


def test_the_sweep_scores_each_setting_and_direction(tiny_checkpoints: Path, synth_dir: Path) -> None:
    results = evaluate_edits(tiny_checkpoints, "latest", synth_dir, n=2, strengths=(0.0, 0.5), steps=4,
                             guidance_scales=(2.0,), classifier_steps=2, seed=0, precision="fp32",
                             references=("source", "null"), judges=2)
    rows = results["rows"]
    assert [(r["reference"], r["strength"], r["direction"]) for r in rows] == [
        (reference, strength, direction) for reference in ("source", "null") for strength in (0.0, 0.5)
        for direction in ("smiling -> not_smiling", "not_smiling -> smiling")]
    for row in rows:
        assert row["guidance_scale"] == 2.0 and row["hold_guidance"] == 0.0  # no reader: nothing to hold by
        for key in ("success", "kept_all", "kept_Eyeglasses", "kept_Male", "kept_Young"):
            entry = row[key]
            assert entry["n"] == 2 and 0 <= entry["low"] <= entry["rate"] <= entry["high"] <= 1, key
            assert len(entry["members"]) == 2, key
        kept = [row[f"kept_{name}"] for name in ("Eyeglasses", "Male", "Young")]
        assert row["kept_all"]["rate"] <= min(entry["rate"] for entry in kept)  # all three at once, face by face
        for k in range(2):  # and member by member
            assert row["kept_all"]["members"][k] <= min(entry["members"][k] for entry in kept)
    assert results["judge_seeds"] == [0, 1]
    assert set(results["judge_accuracy"]) == {"Smiling", "Eyeglasses", "Male", "Young"}
    report = markdown_report(results, "python -m training evaluate-edit …")
    assert report.count("| source | 2 | 0 | 0 | ") == 2 and report.count("| null | 2 | 0 | 0.5 | ") == 2
    assert "a panel of 2 classifiers" in report


class LabelRecorder(torch.nn.Module):
    """The tiny UNet, passed through, remembering the labels of every call (the wiring under test is which
    condition each phase of an edit runs under)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls.append(labels.clone())
        return self.unet(x, t, labels)


@pytest.mark.parametrize("reference, expected", [("source", 0.0), ("null", 2.0)])
def test_an_edit_inverts_under_its_reference_and_guides_away_from_it(tiny_checkpoints: Path, reference: str,
                                                                     expected: float) -> None:
    model = LatentDiffusion.load(tiny_checkpoints, "latest", torch.device("cpu"), torch.float32)
    recorder = LabelRecorder(model.unet)
    latents = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    targets = model.labels_for({"Smiling": True}).expand(2, -1)
    noise = ImageNoise([(0, 0), (0, 1)])
    steps, depth = 4, 3
    edited = model.edit_latents(latents, targets, steps, depth, 2.0, noise, reference, unet=recorder)
    assert edited.shape == latents.shape and torch.isfinite(edited).all()
    inversion_calls = depth * (1 + DEFAULT_REFINEMENTS)
    inversion, regeneration = recorder.calls[:inversion_calls], recorder.calls[inversion_calls:]
    assert len(regeneration) == depth
    for labels in inversion:
        assert torch.equal(labels, torch.full((2, 1), expected))
    for labels in regeneration:  # one batch: the target rows, then the reference rows
        assert torch.equal(labels, torch.tensor([[1.0], [1.0], [expected], [expected]]))


def test_source_labels_flip_given_attributes_and_keep_open_ones(tiny_checkpoints: Path) -> None:
    model = LatentDiffusion.load(tiny_checkpoints, "latest", torch.device("cpu"), torch.float32)
    null = model.unet.config.null_label
    targets = torch.tensor([[1.0], [0.0], [float(null)], [0.25]])
    assert torch.equal(model.source_labels(targets), torch.tensor([[0.0], [1.0], [float(null)], [0.75]]))


def test_the_sweep_measures_the_focused_scope_at_each_threshold(tiny_checkpoints: Path, synth_dir: Path) -> None:
    results = evaluate_edits(tiny_checkpoints, "latest", synth_dir, n=2, strengths=(0.5,), steps=4,
                             guidance_scales=(2.0,), classifier_steps=2, seed=0, precision="fp32",
                             scopes=("region", "focused"), focus_thresholds=(0.25, 0.5), judges=1)
    assert [row["scope"] for row in results["rows"]] == ["region"] * 2 + ["focused 0.25"] * 2 + ["focused 0.5"] * 2
    report = markdown_report(results, "python -m training evaluate-edit …")
    assert report.count("| focused 0.25 | source | 2 | 0 | 0.5 | ") == 2


def test_tuning_faces_are_disjoint_from_the_reported_ones() -> None:
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1)
    labels = (torch.arange(20) % 2).view(20, 1)
    report, tuning = held_out_faces(images, labels, 5), held_out_faces(images, labels, 5, tuning=True)
    for value in (True, False):
        assert len(tuning[value]) == 5
        assert not set(report[value].flatten().tolist()) & set(tuning[value].flatten().tolist())
        assert ((tuning[value].flatten() % 2) == int(value)).all()
    with pytest.raises(ValueError, match="lower --n"):
        held_out_faces(images, labels, 6, tuning=True)


def test_an_edit_mask_covers_the_set_attributes_regions_and_else_the_whole_image() -> None:
    regions = {"Smiling": (0.5, 0.75, 0.25, 0.125), "Eyeglasses": (0.5, 0.25, 0.25, 0.125)}
    null = 2.0
    targets = torch.tensor([[1.0, null, null],  # Smiling only: the mouth ellipse
                            [0.0, 1.0, null],  # Smiling and Eyeglasses: both ellipses
                            [null, null, 1.0],  # an attribute with no region: everywhere
                            [null, null, null]])  # nothing set (unconditional): everywhere
    mask = edit_mask(targets, ("Smiling", "Eyeglasses", "Male"), null, regions, (16, 16))
    assert mask.shape == (4, 1, 16, 16) and mask.min() >= 0 and mask.max() <= 1
    mouth, eyes = (0, 0, 12, 8), (0, 0, 4, 8)  # (row, channel, y, x) at the ellipses' centres
    assert mask[mouth] == 1 and mask[eyes] == 0 and mask[0, 0, 0, 0] == 0 and mask[0, 0, 12, 0] == 0
    assert mask[1, 0, 12, 8] == 1 and mask[1, 0, 4, 8] == 1 and mask[1, 0, 8, 0] == 0
    assert torch.equal(mask[2:], torch.ones(2, 1, 16, 16))
    soft = mask[0, 0, 12]  # across the mouth: full in the middle, fading out toward the sides
    assert 0 < soft[3] < 1 and soft[3] < soft[5] <= soft[8]


def test_a_region_edit_keeps_the_input_outside_the_region_and_an_image_edit_does_not(tiny_checkpoints: Path) -> None:
    model = LatentDiffusion.load(tiny_checkpoints, "latest", torch.device("cpu"), torch.float32)
    latents = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(1))
    targets = model.labels_for({"Smiling": True}).expand(2, -1)
    mask = edit_mask(targets, model.attributes, model.unet.config.null_label, EDIT_REGIONS,
                     tuple(model.latent_shape[1:])).expand_as(latents)
    outside, inside = mask == 0, mask == 1
    assert outside.any() and inside.any()
    seen: list[torch.Tensor] = []
    edits = {scope: model.edit_latents(latents, targets, 4, 3, 2.0, ImageNoise([(0, 0), (0, 1)]), scope=scope,
                                       callback=lambda i, x, x0: seen.append(x0))
             for scope in ("region", "image")}
    region_x0 = seen[:3]  # the x0 predictions of the region edit's three regeneration steps
    assert torch.equal(edits["region"][outside], latents[outside])
    assert all(torch.equal(x0[outside], latents[outside]) for x0 in region_x0)
    assert not torch.allclose(edits["region"][inside], latents[inside], atol=1e-3)
    assert not torch.allclose(edits["image"][outside], latents[outside], atol=1e-3)
    with pytest.raises(ValueError, match="scope"):
        model.edit_latents(latents, targets, 4, 3, 2.0, ImageNoise([(0, 0), (0, 1)]), scope="mouth")


class ActsOnAPatch(torch.nn.Module):
    """A denoiser whose output under Smiling = 1 exceeds the one under 0 by 1 on the latent cells of ``patch`` (a
    bool ``[h, w]``) and by ``0.1`` elsewhere in the left half: the edit acts on the patch, by construction."""

    def __init__(self, patch: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a dtype to read, as a network has
        self.gap = patch.float()
        self.gap[:, : patch.shape[1] // 2] = self.gap[:, : patch.shape[1] // 2].clamp_min(0.1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + labels[:, :1, None, None] * self.gap


def test_the_focus_mask_covers_where_the_predictions_differ_grown_by_a_cell(tiny_checkpoints: Path) -> None:
    model = LatentDiffusion.load(tiny_checkpoints, "latest", torch.device("cpu"), torch.float32)
    h, w = model.latent_shape[1:]
    patch = torch.zeros(h, w, dtype=torch.bool)
    patch[10:12, 6:9] = True
    latents = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(4))
    sources, targets = torch.zeros(3, 1), torch.ones(3, 1)
    mask = model.focus_mask(latents, sources, targets, unet=ActsOnAPatch(patch))
    grown = torch.zeros(h, w, dtype=torch.bool)
    grown[9:13, 5:10] = True
    assert mask.shape == (3, 1, h, w)
    assert torch.equal(mask, grown.float().expand(3, 1, h, w))  # 0.1 of the largest is under half the threshold
    low = model.focus_mask(latents, sources, targets, threshold=0.15, unet=ActsOnAPatch(patch))
    assert 0 < low[0, 0, 0, 0] < 1 and low[0, 0, 0, -1] == 0  # a fraction in the left half, none on the right
    one = model.focus_mask(latents[1:2], sources[1:2], targets[1:2], threshold=0.15, unet=ActsOnAPatch(patch))
    assert torch.equal(one, low[1:2])  # a row's mask does not depend on its batch


def test_a_focused_edit_changes_only_the_region_where_the_model_says_the_edit_acts(tiny_checkpoints: Path) -> None:
    model = LatentDiffusion.load(tiny_checkpoints, "latest", torch.device("cpu"), torch.float32)
    latents = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(5))
    targets = model.labels_for({"Smiling": True}).expand(2, -1)
    noise = ImageNoise([(0, 0), (0, 1)])
    region = edit_mask(targets, model.attributes, model.unet.config.null_label, EDIT_REGIONS,
                       tuple(model.latent_shape[1:]))
    focus = model.focus_mask(latents, model.source_labels(targets), targets)
    kept = ((region * focus) == 0).expand_as(latents)
    assert (kept & (region > 0).expand_as(latents)).any()  # the focus narrows the region
    focused = model.edit_latents(latents, targets, 4, 3, 2.0, noise, scope="focused")
    assert torch.equal(focused[kept], latents[kept])
    assert not torch.allclose(focused[~kept], latents[~kept], atol=1e-3)


class KnowsTheFace(torch.nn.Module):
    """A denoiser that knows the clean latents ``x0``: exact under ``Male`` = ``male`` (column 1), off by a constant
    under the other value, so the better-denoising value is ``male`` by construction."""

    def __init__(self, schedule: NoiseSchedule, x0: torch.Tensor, trials: int, male: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a dtype to read, as a network has
        self.schedule, self.x0, self.trials, self.male = schedule, x0.repeat_interleave(trials, 0), trials, male

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        abar = self.schedule.abar(t, x)
        noise = (x - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        exact = self.schedule.target(self.x0, noise, t)
        return exact + 0.5 * (labels[:, 1] != self.male).float().view(-1, 1, 1, 1)


@pytest.mark.parametrize("male", [0.0, 1.0])
def test_open_attributes_are_read_as_the_value_the_model_denoises_best(tiny_checkpoints: Path, male: float) -> None:
    model = LatentDiffusion.load(tiny_checkpoints, "latest", torch.device("cpu"), torch.float32)
    x0 = torch.randn((3, *model.latent_shape), generator=torch.Generator().manual_seed(2))
    null = float(model.unet.config.null_label)
    labels = torch.tensor([[1.0, null], [0.0, null], [1.0, 0.0]])  # the last row's Male is given: kept as it is
    read = model.read_open_attributes(x0, labels, KnowsTheFace(model.schedule, x0, 4, male), trials=4)
    assert torch.equal(read, torch.tensor([[1.0, male], [0.0, male], [1.0, 0.0]]))
    assert torch.equal(model.read_open_attributes(x0, labels[:2, :1]), labels[:2, :1])  # nothing open: as given


def test_an_edit_holds_the_attributes_it_leaves_open_at_the_inputs_values(tiny_checkpoints: Path) -> None:
    tiny = LatentDiffusion.load(tiny_checkpoints, "latest", torch.device("cpu"), torch.float32)
    two = dataclasses.replace(tiny.unet.config, num_attributes=2)
    model = dataclasses.replace(tiny, unet=UNet(two).eval(),
                                manifest=dataclasses.replace(tiny.manifest, attributes=("Smiling", "Male")))
    latents = torch.randn((2, *model.latent_shape), generator=torch.Generator().manual_seed(3))
    targets = model.labels_for({"Smiling": True}).expand(2, -1)
    held = model.read_open_attributes(latents, model.source_labels(targets))[:, 1]
    assert set(held.tolist()) <= {0.0, 1.0}
    recorder = LabelRecorder(model.unet)
    edited = model.edit_latents(latents, targets, 4, 2, 2.0, ImageNoise([(0, 0), (0, 1)]), unet=recorder)
    outside = edit_mask(targets, model.attributes, model.unet.config.null_label, EDIT_REGIONS,
                        tuple(model.latent_shape[1:])).expand_as(latents) == 0
    assert outside.any() and torch.equal(edited[outside], latents[outside])  # the region is Smiling's, held or not
    reading_calls = 2  # one per value of the one open attribute
    for labels in recorder.calls[reading_calls:]:  # inversion under the source, regeneration under target + source
        assert torch.equal(labels[:, 1], held.repeat(len(labels) // 2))
    smiling = {tuple(labels[:, 0].tolist()) for labels in recorder.calls[reading_calls:]}
    assert smiling == {(0.0, 0.0), (1.0, 1.0, 0.0, 0.0)}
