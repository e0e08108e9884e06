"""One JSON summary of a ``bench/gpu.sh`` run, rewritten after every stage: each stage's exit code and seconds
(``gpu_stages.jsonl``), every benchmark's results file, and the headline figures pulled out of them
(absent where a stage did not get that far).

    BENCH_RESULTS=bench/results/gpu python -m bench.gpu_summary      # -> bench/results/gpu/gpu_summary.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS

# headline figure -> (results file, key path inside it)
HEADLINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "batch_invariant_fp16": ("gpu_checks", ("invariance", "identical")),
    "psnr_fp16_vs_fp32_db": ("gpu_checks", ("precision", "psnr_db_mean")),
    "fallbacks_unprovoked": ("gpu_checks", ("fallbacks_unprovoked",)),
    "fallback_provoked": ("gpu_checks", ("fallback", "provoked")),
    "peak_memory_bytes": ("gpu_checks", ("memory", "peak_bytes_by_batch")),
    "sampling_loop_sync_free": ("gpu_checks", ("sync", "sync_free")),
    "compile_s_per_bucket": ("gpu_compile", ("compile", "bucket_compile_s")),
    "graphs_compiled_by_jobs": ("gpu_compile", ("compile", "graphs_compiled_by_jobs")),
    "compiled_images_per_s": ("gpu_compile", ("compile", "images_per_s")),
    "speedups_vs_ddpm_1000": ("baseline", ("speedups",)),
    "ddp_resume_ok": ("ddp_resume", ("ok",)),
    "ddp_resume_max_abs_weight_diff": ("ddp_resume", ("max_abs_weight_diff",)),
}


def dig(record: dict[str, Any] | None, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def summarize(results: Path) -> dict[str, Any]:
    files = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json")) if p.stem != "gpu_summary"}
    stages_file = results / "gpu_stages.jsonl"
    stages = [json.loads(line) for line in stages_file.read_text().splitlines()] if stages_file.exists() else []
    headline = {name: dig(files.get(file), path) for name, (file, path) in HEADLINES.items()}
    return {"stages": stages, "headline": headline, "results": files}


def main() -> int:
    summary = summarize(RESULTS)
    (RESULTS / "gpu_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({"stages": summary["stages"], "headline": summary["headline"]}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
