"""``python -m bench.student`` on the tiny teacher and its student (a smoke run: the figures that matter come from
the real model; nothing here asserts a time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import common, student
from facegen.model.checkpoints import served_versions


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


def table_rows(output: str) -> list[list[str]]:
    """The cells of the Markdown table under ``## student`` in ``output``, header and rule left out."""
    lines = output.split("## student", 1)[1].splitlines()
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    return cells[2:]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))  # markdown_table writes 1000 and above with thousands separators


@pytest.mark.slow  # DDPM 1000 is a real 1000-step run, even on the tiny model
def test_the_student_bench_measures_every_row_against_ddpm_1000(tiny_student_checkpoints: Path, results: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    teacher, version = served_versions(tiny_student_checkpoints, "latest")
    assert student.main(["--checkpoints", str(tiny_student_checkpoints), "--batch", "2", "--repeats", "1",
                         "--student-steps", "1,2,4", "--precision", "fp32", "--latency"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [(row[0], row[1], row[2]) for row in rows] == [
        ("ddpm", "1000", "2000"), ("dpmpp", "20", "40"), (f"student `{version}`", "1", "1"),
        (f"student `{version}`", "2", "2"), (f"student `{version}`", "4", "4")]
    rates, ratios = [number(row[3]) for row in rows], [number(row[4]) for row in rows]
    assert all(rate > 0 for rate in rates) and ratios[0] == 1 and all(ratio > 0 for ratio in ratios)
    assert rows[0][5] == "–" and all(number(row[5]) > 0 for row in rows[1:])  # batch-1 latency but for DDPM
    record = json.loads((results / "student.json").read_text())
    assert (record["model"], record["student"], record["batch"]) == (teacher, version, 2)
    assert [entry["vs_ddpm_1000"] for entry in record["results"]] == pytest.approx(ratios, rel=0.01)


def test_the_student_bench_refuses_a_model_without_a_student_or_steps_it_does_not_take(
        tiny_checkpoints: Path, tiny_student_checkpoints: Path, results: Path) -> None:
    teacher, _ = served_versions(tiny_checkpoints, "latest")
    with pytest.raises(SystemExit, match=f"model {teacher} has no distilled student"):
        student.main(["--checkpoints", str(tiny_checkpoints), "--precision", "fp32"])
    with pytest.raises(SystemExit, match="samples in 1 to 8 steps, not 9"):
        student.main(["--checkpoints", str(tiny_student_checkpoints), "--precision", "fp32", "--student-steps", "2,9"])
    assert not (results / "student.json").exists()  # nothing was measured
