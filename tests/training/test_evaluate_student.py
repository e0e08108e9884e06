"""`python -m training evaluate` with the student sampler: the teacher's newest student judged beside the teacher's
own samplers in one run, each row naming the version that sampled it, and the settings it cannot take refused
before any work."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from facegen.model.checkpoints import (
    list_versions,
    read_evaluation,
    read_manifest,
    resolve_version,
    served_versions,
)
from facegen.model.config import ConsistencyConfig
from training.__main__ import main
from training.evaluation.evaluate import Setting, SettingError, evaluate_versions, parse_settings
from training.evaluation.protocol import REPORT_SEED, TUNING_SEED

MAX_STEPS = ConsistencyConfig().max_steps
LOW, HIGH = ConsistencyConfig().guidance_range


@pytest.fixture()
def checkpoints(tiny_student_checkpoints: Path, tmp_path: Path) -> Path:
    """A copy of the tiny teacher and its student: evaluation writes records beside both."""
    return Path(shutil.copytree(tiny_student_checkpoints, tmp_path / "ck"))


def evaluate_command(checkpoints: Path, data: Path, settings: str, *extra: str) -> list[str]:
    return ["evaluate", "--checkpoints", str(checkpoints), "--data", str(data), "--n", "2", "--classifier-steps", "2",
            "--judges", "1", "--precision", "fp32", "--settings", settings, *extra]


def test_settings_parse_with_guidance_and_a_per_row_n() -> None:
    assert parse_settings("student:4,dpmpp:20:3,ddpm:1000@100", 5.0) == [
        Setting("student", 4, 5.0), Setting("dpmpp", 20, 3.0), Setting("ddpm", 1000, 5.0, n=100)]
    assert parse_settings("student:2@7", None) == [Setting("student", 2, None, n=7)]
    with pytest.raises(ValueError, match="SAMPLER:STEPS"):
        parse_settings("student", None)


def test_the_student_is_judged_beside_its_teacher_in_one_run(checkpoints: Path, synth_dir: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    teacher, student = served_versions(checkpoints, "latest")
    newest = list_versions(checkpoints, "diffusion")[-1].version
    assert student is not None and newest == student  # exported after its teacher, yet `latest` is the teacher
    assert resolve_version(checkpoints, "diffusion", "latest").name == teacher
    guidance = read_manifest(resolve_version(checkpoints, "diffusion", teacher)).sampling.guidance_scale
    assert main(evaluate_command(checkpoints, synth_dir, "student:1,student:2,dpmpp:2,ddpm:3@3", "--no-fid")) == 0
    report = capsys.readouterr().out
    assert f"Model `{teacher}`" in report  # "latest" is the newest plain model, not its student
    for steps in (1, 2):  # the teacher's default guidance, n 2
        assert f"| student `{student}` | {steps} | {guidance:g} | 2 |" in report
    assert f"| dpmpp | 2 | {guidance:g} | 2 |" in report and f"| ddpm | 3 | {guidance:g} | 3 |" in report
    assert "not a headline measurement" in report

    rows = read_evaluation(resolve_version(checkpoints, "diffusion", teacher))["evaluation"]["settings"]
    g = f"g{guidance:g}"
    assert [(row["setting"], row["version"], row["n_per_label"]) for row in rows] == [
        (f"student-1-{g}", student, 2), (f"student-2-{g}", student, 2), (f"dpmpp-2-{g}", teacher, 2),
        (f"ddpm-3-{g}", teacher, 3)]
    for row in rows:
        for label in ("smiling", "not_smiling"):
            low, high = row[f"accuracy_{label}_ci95"]
            assert 0 <= low <= row[f"accuracy_{label}"] <= high <= 1
    # the student's own record holds the rows it sampled, judged by the same panel against the same faces
    own = read_evaluation(resolve_version(checkpoints, "diffusion", student))["evaluation"]
    assert own["teacher"] == teacher and own["settings"] == rows[:2] and own["split"] == "test"


def test_tuning_the_student_reads_the_validation_split_and_its_seeds_then_refuse_to_report(
        checkpoints: Path, synth_dir: Path) -> None:
    teacher, student = served_versions(checkpoints, "latest")
    assert main(evaluate_command(checkpoints, synth_dir, "student:1,student:4", "--tuning", "--no-fid")) == 0
    for version in (teacher, student):
        record = read_evaluation(resolve_version(checkpoints, "diffusion", version))
        assert "evaluation" not in record  # the report split was not looked at
        assert record["tuning"]["split"] == "val" and record["tuning"]["seeds"] == [TUNING_SEED]
    assert [row["steps"] for row in record["tuning"]["settings"]] == [1, 4]
    args = dict(n=2, settings=[Setting("student", 1, None)], classifier_steps=1, fid=False, precision="fp32",
                judges=1)
    main(evaluate_command(checkpoints, synth_dir, "student:2", "--tuning", "--no-fid", "--seed", "55"))
    with pytest.raises(ValueError, match=f"seed 55 trained or tuned model {teacher}"):
        evaluate_versions(checkpoints, [teacher], synth_dir, seed=55, **args)
    # a student evaluated by name samples itself, and the seeds that tuned it stay refused for its report
    with pytest.raises(ValueError, match=f"seed 55 trained or tuned model {student}"):
        evaluate_versions(checkpoints, [student], synth_dir, seed=55, **args)
    evaluate_versions(checkpoints, [teacher], synth_dir, seed=REPORT_SEED, **args)


def test_a_teacher_without_a_student_is_refused_before_any_work(tiny_checkpoints: Path, synth_dir: Path,
                                                                 tmp_path: Path) -> None:
    checkpoints = Path(shutil.copytree(tiny_checkpoints, tmp_path / "ck"))
    teacher = served_versions(checkpoints, "latest")[0]
    with pytest.raises(SystemExit, match=f"evaluate: model {teacher} has no distilled student under .*distill "
                                         f"--teacher {teacher}"):
        main(evaluate_command(checkpoints, synth_dir, "dpmpp:2,student:4"))
    assert read_evaluation(resolve_version(checkpoints, "diffusion", teacher)) == {}  # nothing measured


@pytest.mark.parametrize(("settings", "refusal"), [
    (f"student:{MAX_STEPS + 1}", f"setting student:{MAX_STEPS + 1}: steps must be in 1..{MAX_STEPS}"),
    ("student:0", f"steps must be in 1..{MAX_STEPS}"),
    (f"student:4:{HIGH + 1:g}", f"distilled for guidance {LOW:g} to {HIGH:g} \\(or 0\\), not {HIGH + 1:g}"),
])
def test_settings_the_student_cannot_take_are_refused(checkpoints: Path, synth_dir: Path, settings: str,
                                                      refusal: str) -> None:
    with pytest.raises(SystemExit, match=refusal):
        main(evaluate_command(checkpoints, synth_dir, settings))
    teacher, _ = served_versions(checkpoints, "latest")
    with pytest.raises(SettingError, match=refusal):
        evaluate_versions(checkpoints, [teacher], synth_dir, 2, parse_settings(settings, None), REPORT_SEED, 1)
    assert read_evaluation(resolve_version(checkpoints, "diffusion", teacher)) == {}
