"""The edit evaluation on the tiny model: strength 0 is the VAE round trip, every row is scored with intervals."""

from __future__ import annotations

from pathlib import Path

import torch

from training.data.celeba import load_split, to_float
from training.evaluate_edit import edit_images, evaluate_edits, markdown_report
from training.imaging import to_uint8
from training.pipeline import LatentDiffusion


def test_strength_zero_is_the_vae_round_trip_and_a_deep_edit_changes_the_face(tiny_checkpoints: Path,
                                                                            synth_dir: Path) -> None:
    model = LatentDiffusion.load(tiny_checkpoints, "latest", torch.device("cpu"), torch.float32)
    faces, _ = load_split(synth_dir, "test", model.manifest.data)
    faces = faces[:3]
    round_trip = to_uint8(model.decode(model.encode(to_float(faces))))
    assert torch.equal(edit_images(model, faces, {"Smiling": True}, 0.0, steps=4, guidance_scale=2.0), round_trip)
    deep = edit_images(model, faces, {"Smiling": True}, 1.0, steps=4, guidance_scale=2.0)
    assert deep.shape == faces.shape and not torch.equal(deep, round_trip)


def test_the_sweep_scores_each_strength_and_direction(tiny_checkpoints: Path, synth_dir: Path) -> None:
    results = evaluate_edits(tiny_checkpoints, "latest", synth_dir, n=2, strengths=(0.0, 0.5), steps=4,
                             guidance_scale=2.0, classifier_steps=2, seed=0, precision="fp32")
    rows = results["rows"]
    assert [(r["strength"], r["direction"]) for r in rows] == [
        (0.0, "smiling -> not_smiling"), (0.0, "not_smiling -> smiling"),
        (0.5, "smiling -> not_smiling"), (0.5, "not_smiling -> smiling")]
    for row in rows:
        for key in ("success", "kept_all", "kept_Eyeglasses", "kept_Male", "kept_Young"):
            entry = row[key]
            assert entry["n"] == 2 and 0 <= entry["low"] <= entry["rate"] <= entry["high"] <= 1, key
    assert set(results["judge_accuracy"]) == {"Smiling", "Eyeglasses", "Male", "Young"}
    report = markdown_report(results, "python -m training evaluate-edit …")
    assert report.count("| 0 | ") == 2 and report.count("| 0.5 | ") == 2
