"""The evaluation tool end to end on the tiny model: every number with its interval, seeds kept apart."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from facegen.model.checkpoints import MANIFEST_FILE, load_checkpoint, read_evaluation
from training.data.celeba import load_split
from training.evaluation.evaluate import SeedError, Setting, evaluate, evaluate_versions, markdown_report
from training.evaluation.judge import first_attribute_only
from training.evaluation.protocol import JUDGE_PANEL_SIZE, REPORT_SEED, TUNING_SEED


@pytest.fixture()
def checkpoints(tiny_checkpoints: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoints: evaluation writes records beside its versions."""
    return Path(shutil.copytree(tiny_checkpoints, tmp_path / "ck"))


@pytest.mark.timeout(1800)  # Inception features on a loaded 2-core CPU
def test_evaluation_reports_rates_with_intervals_kid_fid_and_the_judge(checkpoints: Path, synth_dir: Path) -> None:
    sealed = {path: path.read_bytes() for path in checkpoints.rglob(MANIFEST_FILE)}
    results = evaluate(checkpoints, "latest", synth_dir, n=6, settings=[Setting("dpmpp", 3, 2.0)], seed=REPORT_SEED,
                       classifier_steps=5, precision="fp32")
    assert {path: path.read_bytes() for path in sealed} == sealed  # a published manifest never changes
    row = results["settings"][0]
    for key in ("fid", "fid_smiling", "fid_not_smiling", "kid", "kid_std", "kid_smiling", "accuracy_smiling",
                "accuracy_not_smiling", "seconds_per_image"):
        assert math.isfinite(row[key]), key
    for label in ("smiling", "not_smiling"):
        low, high = row[f"accuracy_{label}_ci95"]
        assert 0 <= low <= row[f"accuracy_{label}"] <= high <= 1 and high - low > 0.2  # n = 6: a wide interval
    assert row["n_per_label"] == 6 and row["reference_images"] == 12
    judge = results["judge"]
    assert set(judge) >= {"sharp", "blurred", "reconstructed", "spread", "warning"}
    assert judge["sharp"]["n"] == judge["reconstructed"]["n"] == 12
    assert (judge["warning"] is None) == (judge["spread"] <= 0.02)
    # the default judge is a panel: its seeds start at the evaluation's, and each rate carries every member's
    assert results["judge_seeds"] == list(range(REPORT_SEED, REPORT_SEED + JUDGE_PANEL_SIZE))
    for entry in (judge["sharp"], judge["reconstructed"], results["vae_attribute_agreement"]):
        assert len(entry["members"]) == JUDGE_PANEL_SIZE and all(0 <= r <= 1 for r in entry["members"])
    assert len(row["accuracy_smiling_members"]) == JUDGE_PANEL_SIZE
    assert math.isfinite(results["vae_psnr_db"]) and 0 <= results["vae_attribute_agreement"]["rate"] <= 1
    real, through_vae = results["floors"]["real"], results["floors"]["vae"]
    assert real["reference_images"] == 12 and all(math.isfinite(real[k]) for k in ("kid", "fid"))
    assert through_vae["fid"] != real["fid"]  # the round trip changes the faces, and so their distance
    record = read_evaluation(load_checkpoint(checkpoints, "diffusion", "latest").path)
    assert record["evaluation"]["settings"][0]["setting"] == "dpmpp-3-g2"
    assert record["evaluation"]["seed"] == REPORT_SEED
    report = markdown_report(results, "python -m training evaluate …")
    assert "| dpmpp | 3 | 2 |" in report and "(12 / 12)" in report and "not a headline measurement" in report
    assert "floors at the same n: real training faces KID" in report
    assert f"a panel of {JUDGE_PANEL_SIZE} classifiers" in report and "members " in report


def test_colour_adds_each_labels_mouths_outside_real_colours(checkpoints: Path, synth_dir: Path,
                                                             tmp_path: Path) -> None:
    """``evaluate --colour``: every row carries the colour instrument's rate per label (n, Wilson interval), in the
    record and as two more columns of the report."""
    from training.__main__ import main

    report = tmp_path / "report.md"
    assert main(["evaluate", "--checkpoints", str(checkpoints), "--data", str(synth_dir), "--n", "4", "--settings",
                 "dpmpp:3:2,ddim:3:1", "--no-fid", "--judges", "1", "--classifier-steps", "2", "--precision", "fp32",
                 "--colour", "--synth-seed", "3", "--identity-steps", "2", "--identity-cache", str(tmp_path / "id"),
                 "--report", str(report)]) == 0
    rows = read_evaluation(load_checkpoint(checkpoints, "diffusion", "latest").path)["evaluation"]["settings"]
    for row in rows:
        for label in ("smiling", "not_smiling"):
            colour = row[f"colour_outside_{label}"]
            assert colour["n"] == 4 and 0 <= colour["low"] <= colour["rate"] <= colour["high"] <= 1
    text = report.read_text()
    assert "| mouths outside real colour, smiling [95% CI] | mouths outside real colour, not_smiling [95% CI] |" in text
    table = [line for line in text.splitlines() if line.startswith("| dpmpp | 3 |") or line.startswith("|---")]
    assert len({line.count("|") for line in table}) == 1  # the header's rule and the rows have as many cells


def test_a_report_refuses_the_seeds_that_trained_or_tuned_the_model(checkpoints: Path, synth_dir: Path) -> None:
    args = dict(n=2, settings=[Setting("ddim", 2, 2.0)], classifier_steps=1, fid=False, precision="fp32")
    with pytest.raises(SeedError, match=f"seed {TUNING_SEED} trained or tuned"):
        evaluate(checkpoints, "latest", synth_dir, seed=TUNING_SEED, **args)
    evaluate(checkpoints, "latest", synth_dir, seed=77, tuning=True, **args)
    metrics = read_evaluation(load_checkpoint(checkpoints, "diffusion", "latest").path)
    assert metrics["tuning"]["seeds"] == [77] and "evaluation" not in metrics
    with pytest.raises(SeedError, match="seed 77"):  # once it has tuned, 77 no longer reports
        evaluate(checkpoints, "latest", synth_dir, seed=77, **args)


def test_a_vae_version_is_measured_alone_by_the_same_judge(checkpoints: Path, synth_dir: Path) -> None:
    vae_version = load_checkpoint(checkpoints, "vae", "latest").version
    vae_row, model_row = evaluate_versions(checkpoints, ["latest"], synth_dir, n=2, settings=[Setting("ddim", 2, 2.0)],
                                           seed=REPORT_SEED, classifier_steps=2, fid=False, precision="fp32",
                                           vae_versions=(vae_version,))
    assert vae_row["vae_version"] == vae_version and "settings" in model_row
    # the diffusion model decodes with the same VAE: its round trip is the same measurement, up to latent scaling
    assert vae_row["vae_psnr_db"] == pytest.approx(model_row["vae_psnr_db"], abs=0.05)
    assert vae_row["judge_on_reconstructions"]["n"] == 12
    assert read_evaluation(load_checkpoint(checkpoints, "vae", vae_version).path)["evaluation"]["vae_version"] == vae_version
    assert f"VAE `{vae_version}` alone" in markdown_report(vae_row, "python -m training evaluate …")
    assert vae_row["judge_seeds"] == model_row["judge_seeds"]
    # without a diffusion version: the VAE alone, the same judge (same seed and steps), nothing generated
    (alone,) = evaluate_versions(checkpoints, [], synth_dir, n=2, settings=[Setting("ddim", 2, 2.0)], seed=REPORT_SEED,
                                 classifier_steps=2, precision="fp32", vae_versions=(vae_version,))
    assert alone["vae_attribute_agreement"] == vae_row["vae_attribute_agreement"]
    assert alone["vae_psnr_db"] == vae_row["vae_psnr_db"]
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_versions(checkpoints, [], synth_dir, n=2, settings=[], seed=REPORT_SEED, classifier_steps=2)


def test_choosing_a_vae_judges_the_validation_split_and_leaves_the_report_alone(checkpoints: Path,
                                                                               synth_dir: Path) -> None:
    """``tuning=True`` reads the validation split in place of the test split and stores its numbers apart."""
    vae_version = load_checkpoint(checkpoints, "vae", "latest").version
    args = dict(n=2, settings=[], classifier_steps=2, precision="fp32", vae_versions=(vae_version,))
    (report,) = evaluate_versions(checkpoints, [], synth_dir, seed=REPORT_SEED, **args)
    (chosen,) = evaluate_versions(checkpoints, [], synth_dir, seed=TUNING_SEED, tuning=True, **args)
    metrics = read_evaluation(load_checkpoint(checkpoints, "vae", vae_version).path)
    assert (report["split"], chosen["split"]) == ("test", "val")
    assert metrics["evaluation"] == report and metrics["tuning"] == chosen
    assert chosen["judge_seeds"] == list(range(TUNING_SEED, TUNING_SEED + JUDGE_PANEL_SIZE))
    _, val_labels = load_split(synth_dir, "val", first_attribute_only(load_checkpoint(checkpoints, "vae",
                                                                                      vae_version).manifest.data))
    assert chosen["judge_on_reconstructions"]["n"] == len(val_labels)
    assert chosen["vae_psnr_db"] != report["vae_psnr_db"]  # other faces
    assert "on the val split" in markdown_report(chosen, "python -m training evaluate --tuning …")


@pytest.mark.timeout(1800)  # two runs' Inception features on a loaded 2-core CPU
def test_a_feature_cache_gives_the_same_numbers_and_reads_the_repeated_sets(checkpoints: Path, synth_dir: Path,
                                                                           tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    """Two runs with one cache: the first computes each image set's features (test split; per label the real floor,
    the VAE floor and the generated images) and writes them, the second reads every one of them, and both report
    the same KID/FID and floors."""
    cache = tmp_path / "features"
    computed, read = (evaluate_versions(checkpoints, ["latest"], synth_dir, n=4, settings=[Setting("dpmpp", 2, 2.0)],
                                        seed=REPORT_SEED, classifier_steps=3, precision="fp32",
                                        feature_cache=cache)[0] for _ in range(2))
    assert len(list(cache.iterdir())) == 1 + 3 * 2
    assert capsys.readouterr().out.count("read from the cache") == 1 + 3 * 2  # by the second run, of every set
    assert read["settings"][0]["kid"] == computed["settings"][0]["kid"]
    assert read["settings"][0]["fid"] == computed["settings"][0]["fid"]
    assert read["floors"] == computed["floors"]
