"""``evaluate-edit --instruments`` end to end on the tiny model: colour and identity for every row, beside real faces,
their round trips and generated faces, in the report; realism (KID/FID) tells real faces from noise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from facegen.contract.spec import DEFAULT_SAMPLER, DEFAULT_STEPS
from facegen.model.config import DataConfig
from facegen.model.imaging import grid_image
from training.data.celeba import load_split
from training.evaluation.edit_pictures import DIFFERENCE_GAIN, case_rows
from training.evaluation.edit_realism import GENERATED, Realism
from training.evaluation.evaluate_edit import (
    InstrumentOptions,
    evaluate_edits,
    held_out_indices,
    markdown_report,
    realism_references,
)
from training.evaluation.identity import IDENTITY
from training.evaluation.metrics import InceptionFeatures


def test_the_generated_faces_are_sampled_as_the_worker_samples() -> None:
    assert (GENERATED.sampler, GENERATED.steps) == (DEFAULT_SAMPLER.value, DEFAULT_STEPS[DEFAULT_SAMPLER])


def test_the_realism_reference_leaves_out_every_face_an_edit_starts_from() -> None:
    labels = torch.tensor([[1], [0], [1], [1], [0], [0], [1], [0], [1]])
    sources = held_out_indices(labels, 2)
    references = realism_references(labels, sources, None)
    assert references[True].tolist() == [3, 6, 8] and references[False].tolist() == [5, 7]
    assert realism_references(labels, sources, 1)[True].tolist() == [3]
    tuning = held_out_indices(labels, 2, tuning=True)
    assert realism_references(labels, tuning, None)[True].tolist() == [0, 2, 3]


def test_every_row_and_baseline_carries_the_chosen_instruments(tiny_checkpoints: Path, synth_dir: Path,
                                                                tmp_path: Path) -> None:
    options = InstrumentOptions(("colour", "identity"), synth_seed=3, identity_steps=2,
                                identity_cache=tmp_path / "identity")
    results = evaluate_edits(tiny_checkpoints, "latest", synth_dir, n=2, strengths=(0.5,), steps=4,
                             guidance_scales=(2.0,), classifier_steps=2, seed=0, precision="fp32", judges=1,
                             instruments=options, cases=tmp_path / "cases")
    baselines = results["instruments"]["baselines"]
    for value in (True, False):
        for name in ("real", "vae", "generated"):
            assert baselines[value][name]["colour_outside"]["n"] == 2 and "realism" not in baselines[value][name]
        kept = baselines[value]["vae"]["identity_kept"]
        assert set(kept) == {"all"} | {p.name for p in IDENTITY} and kept["all"]["n"] == 2
        assert "identity_kept" not in baselines[value]["real"]  # nothing to keep without a source
        for name in ("perfect", "perfect_vae"):  # the other label's sources drawn with this label's mouth
            assert baselines[value][name]["colour_outside"]["n"] == 2
            assert baselines[value][name]["identity_kept"]["all"]["n"] == 2
    for row in results["rows"]:
        scores = row["instruments"]
        assert scores["colour_outside"]["n"] == 2
        assert 0 <= scores["identity_kept"]["all"]["low"] <= scores["identity_kept"]["all"]["high"] <= 1
    check = results["instruments"]["regressor"]
    assert check["held_out"]["skin"]["n"] == 12 and check["round_trips"]["skin"]["n"] == 4
    assert set(check["tolerance"]) == {p.name for p in IDENTITY if not p.categorical}
    # a regressor trained for two steps reads every face alike, and the check says so: other faces pass as the same
    assert check["other_faces"]["n"] == 12 and check["other_faces"]["rate"] > 0.5
    assert len(list((tmp_path / "identity").glob("identity-*.pt"))) == 1
    report = markdown_report(results, "python -m training evaluate-edit --instruments …")
    assert report.count("| smiling | edits, strength 0.5") == 1 and report.count("| not_smiling | their VAE") == 1
    assert "| smiling | real held-out faces | – | – | " in report  # realism not chosen
    assert "| smiling -> not_smiling | round trips |" in report and "| skin |" in report
    assert "| smiling -> not_smiling | perfect edits through the VAE |" in report
    assert report.count("| not_smiling | perfect edits |") == 1
    assert "Mouth geometry, median error" in report
    for row, label in zip(results["rows"], ("not_smiling", "smiling"), strict=True):  # each direction's cases
        with Image.open(tmp_path / "cases" / f"edit_cases_to_{label}.png") as picture:
            # input | edit | difference, two faces in each of the three groups
            assert picture.size == grid_image(torch.zeros(3 * 3 * 2, 3, 64, 64, dtype=torch.uint8), cols=3).size
        assert row["cases"]["file"] == f"edit_cases_to_{label}.png"
        assert sorted(case["row"] for case in row["cases"]["best"]) == [0, 1]
        assert f"`edit_cases_to_{label}.png`" in report
    with pytest.raises(ValueError, match="--instruments colour identity"):
        evaluate_edits(tiny_checkpoints, "latest", synth_dir, n=2, strengths=(0.5,), steps=4, guidance_scales=(2.0,),
                       classifier_steps=2, seed=0, judges=1, cases=tmp_path / "cases")


def test_the_cases_are_the_worst_colours_the_most_parameters_lost_and_the_best_read() -> None:
    sources = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    edits = sources + 10
    scores = {"colour": torch.tensor([0.5, 3.0, 1.2, 0.1]), "lost": torch.tensor([0, 0, 2, 1]),
              "read": torch.tensor([False, True, True, True])}  # the first edit misses the target: not among the best
    rows, groups = case_rows(sources, edits, scores, per_group=2)
    assert groups == {"colour": [1, 2], "identity": [2, 3], "best": [1, 3]}
    shown = [1, 2, 2, 3, 1, 3]
    assert rows.shape == (18, 3, 2, 2)
    assert torch.equal(rows[0::3], sources[shown]) and torch.equal(rows[1::3], edits[shown])
    assert (rows[2::3] == 10 * DIFFERENCE_GAIN).all()


@pytest.mark.slow  # Inception features and a Fréchet distance per set
def test_realism_puts_real_faces_nearer_the_reference_than_noise(synth_dir: Path, tmp_path: Path) -> None:
    images, labels = load_split(synth_dir, "test", DataConfig(attributes=("Smiling",), image_size=64))
    smiling = images[labels[:, 0] == 1]
    realism = Realism(InceptionFeatures(torch.device("cpu"), tmp_path), {True: smiling[2:]}, seed=0)
    real = realism.score(smiling[:2], True)
    noise = realism.score(torch.randint(0, 256, (2, 3, 64, 64), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.uint8), True)
    assert real["n"] == 2 and real["reference_images"] == len(smiling) - 2
    assert real["kid"] < noise["kid"] and real["fid"] < noise["fid"] and real["kid_std"] >= 0
