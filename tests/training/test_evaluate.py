"""The evaluation tool end to end on the tiny model, and its attribute classifier on separable synthetic faces."""

from __future__ import annotations

import math

from training.checkpoints import load_checkpoint
from training.config import DataConfig
from training.data.synthetic import write_dataset
from training.evaluate import Setting, evaluate, markdown_report, train_classifier


def test_evaluation_produces_finite_numbers_and_records_them(tiny_checkpoints, synth_dir) -> None:
    results = evaluate(tiny_checkpoints, "latest", synth_dir, n=6, settings=[Setting("dpmpp", 3, 2.0)], seed=0,
                       classifier_steps=5)
    row = results["settings"][0]
    for key in ("fid", "fid_smiling", "fid_not_smiling", "accuracy_smiling", "accuracy_not_smiling",
                "seconds_per_image"):
        assert math.isfinite(row[key]), key
    assert 0 <= row["accuracy_smiling"] <= 1 and row["fid"] >= 0
    assert math.isfinite(results["vae_psnr_db"]) and 0 <= results["vae_attribute_agreement"] <= 1
    manifest = load_checkpoint(tiny_checkpoints, "diffusion", "latest").manifest
    assert manifest["metrics"]["evaluation"]["settings"][0]["setting"] == "dpmpp-3-g2"
    report = markdown_report(results, "python -m training evaluate …")
    assert "| dpmpp | 3 | 2 |" in report


def test_classifier_learns_the_smile_of_synthetic_faces(tmp_path) -> None:
    data = write_dataset(tmp_path / "faces", 1600, seed=21, workers=2)
    _, test_images, _, accuracy = train_classifier(data, DataConfig(), steps=400, seed=0)
    assert len(test_images) == 160
    assert accuracy >= 0.9
