"""The CPU-runnable parts of bench/gpu.sh (a smoke run on the tiny checkpoint; the figures that matter come from a
GPU): the serving-path checks write their results after every check, and the summary pulls out the headlines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import common, gpu_checks, gpu_summary
from facegen.model.device import cpu_has_native_bf16


@pytest.fixture
def results(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(gpu_summary, "RESULTS", tmp_path)
    return tmp_path


def test_gpu_checks_smoke_on_cpu(tiny_checkpoints: Path, results: Path) -> None:
    assert gpu_checks.main(["--device", "cpu", "--checkpoints", str(tiny_checkpoints), "--checks",
                            "invariance,precision,fallback,memory,sync", "--batches", "1,2,4", "--steps", "3",
                            "--max-batch", "4", "--precision", "bf16"]) == 0  # a precision with a wider fallback
    record = json.loads((results / "gpu_checks.json").read_text())
    assert record["dtype"] == "torch.bfloat16" and record["steps"] == 3
    assert set(record["invariance"]["batches"]) == {"1", "2"}
    if cpu_has_native_bf16():  # emulated bf16 is not batch-invariant (README "Same seed, same pixels")
        assert record["invariance"]["identical"]
    assert record["precision"]["images"] == 4 and record["precision"]["psnr_db_mean"] > 20  # bf16 vs fp32
    assert record["fallback"]["provoked"] == {"unet": 1, "decoder": 0} and record["fallback"]["other_rows_identical"]
    assert record["fallbacks_unprovoked"] == {"unet": 0, "decoder": 0}
    assert record["memory"]["skipped"] == record["sync"]["skipped"] == "not CUDA"


def test_summary_keeps_stage_outcomes_and_headlines(results: Path) -> None:
    (results / "gpu_stages.jsonl").write_text('{"stage": "checks", "exit_code": 0}\n'
                                              '{"stage": "compile", "exit_code": 124, "timed_out": true}\n')
    (results / "gpu_compile.json").write_text(json.dumps({"compile": {"bucket_compile_s": {"1": 12.5}}}))
    assert gpu_summary.main() == 0
    summary = json.loads((results / "gpu_summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["checks", "compile"]
    assert summary["headline"]["compile_s_per_bucket"] == {"1": 12.5}
    assert summary["headline"]["batch_invariant_fp16"] is None  # that stage left no file
