"""The distilled student against the served default and the original's 1000-step DDPM, end to end: images/s of the
worker's own ``Engine.run`` (sampling + VAE decode, the served model and its student loaded from one checkpoints
folder as a worker loads them) at one batch size, all rows in one run on one machine, with each row's ratio to
DDPM 1000.

    python -m bench.student                                  # CPU, batch 32, the worker's precision
    python -m bench.student --device cuda --precision fp16 --batch 256 --compile reduce-overhead --latency

Rows: DDPM 1000 (one full 1000-step run of one batch: no warm-up, nothing extrapolated), the served default
(``DEFAULT_SAMPLER`` at its default steps), the student at each of ``--student-steps``; every row at the served
model's default guidance (the student takes it as an input: one UNet row per image and step instead of two).
Rows but DDPM are the median of ``--repeats`` runs after a warm-up (with ``--compile``, the warm-up compiles the
batch's shapes). ``--latency``: also each of those rows' median seconds for a single-image request.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from bench.common import markdown_table, save, timed
from facegen.contract.spec import DEFAULT_SAMPLER, DEFAULT_STEPS
from facegen.model.checkpoints import BUNDLED_CHECKPOINTS
from facegen.model.diffusion.samplers import STUDENT_SAMPLER
from worker.engine import Engine, ImageRequest

BASELINE = ("ddpm", 1000)


@dataclass(frozen=True)
class Row:
    sampler: str
    steps: int
    unet_rows_per_image: int  # network evaluations per image over the chain


def rows_to_measure(student_steps: list[int], guidance: float) -> list[Row]:
    """DDPM 1000, the served default, then the student at each step count; the teacher evaluates two rows per
    step at ``guidance`` (one at 0 or 1: ``facegen.model.diffusion.guidance.guided``), the student one."""
    per_step = 1 if guidance in (0.0, 1.0) else 2
    default = (DEFAULT_SAMPLER.value, DEFAULT_STEPS[DEFAULT_SAMPLER])
    return ([Row(sampler, steps, per_step * steps) for sampler, steps in (BASELINE, default)]
            + [Row(STUDENT_SAMPLER, steps, steps) for steps in student_steps])


def run_batch(engine: Engine, batch: int, row: Row, guidance: float) -> None:
    """One ``Engine.run`` of ``batch`` images, half of them with the model's first attribute and half without."""
    attribute = engine.model.attributes[0]
    half = batch // 2
    requests = [ImageRequest("with", {attribute: True}, 1, batch - half)]
    if half:
        requests.append(ImageRequest("without", {attribute: False}, 2, half))
    engine.run(requests, row.sampler, row.steps, guidance)


def measure(engine: Engine, row: Row, batch: int, guidance: float, repeats: int) -> float:
    """Seconds of one run of ``batch`` images: DDPM 1000 once, the others the median of ``repeats`` after a warm-up."""
    baseline = (row.sampler, row.steps) == BASELINE
    return timed(lambda: run_batch(engine, batch, row, guidance), engine.device, repeat=1 if baseline else repeats,
                 warmup=0 if baseline else 1)


def measure_all(engine: Engine, rows: list[Row], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each row's images/s at ``args.batch`` (and with ``args.latency`` its single-image seconds); the served
    default runs first, so that DDPM 1000 meets the guided shapes warm."""
    guidance = engine.model.sampling.guidance_scale
    order = rows[1:2] + rows[:1] + rows[2:]
    results: dict[Row, dict[str, Any]] = {}
    for row in order:
        seconds = measure(engine, row, args.batch, guidance, args.repeats)
        results[row] = {"sampler": row.sampler, "steps": row.steps, "unet_rows_per_image": row.unet_rows_per_image,
                        "guidance_scale": guidance, "batch": args.batch, "images_per_s": args.batch / seconds}
        if args.latency and (row.sampler, row.steps) != BASELINE:
            results[row]["latency_s_batch_1"] = measure(engine, row, 1, guidance, args.repeats)
        print(f"{row.sampler} {row.steps}: {results[row]['images_per_s']:.4g} images/s at batch {args.batch}",
              flush=True)
    baseline = results[rows[0]]["images_per_s"]
    for entry in results.values():
        entry["vs_ddpm_1000"] = entry["images_per_s"] / baseline
    return [results[row] for row in rows]


def table(results: list[dict[str, Any]], student: str, batch: int, latency: bool) -> str:
    header = ["sampler", "steps", "UNet rows / image", f"images/s (batch {batch})", "× DDPM 1000"]
    lines = []
    for entry in results:
        name = entry["sampler"] + (f" `{student}`" if entry["sampler"] == STUDENT_SAMPLER else "")
        line = [name, entry["steps"], entry["unet_rows_per_image"], entry["images_per_s"], entry["vs_ddpm_1000"]]
        if latency:
            line.append(1000 * entry["latency_s_batch_1"] if "latency_s_batch_1" in entry else "–")
        lines.append(line)
    return markdown_table(header + (["ms, batch 1"] if latency else []), lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default=str(BUNDLED_CHECKPOINTS))
    parser.add_argument("--diffusion", default="latest", help="the served model (its newest student runs beside it)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="auto", help="the worker's (auto: fp16 on CUDA; bf16 on CPUs with "
                                                            "native bf16, else fp32)")
    parser.add_argument("--batch", type=int, default=32, help="images per Engine.run, every row")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per row but DDPM 1000's one")
    parser.add_argument("--student-steps", default="1,2,4", help="comma-separated student step counts")
    parser.add_argument("--compile", default="off", help="torch.compile mode of both UNets (reduce-overhead = "
                                                         "CUDA graphs); off = eager")
    parser.add_argument("--latency", action="store_true", help="also single-image seconds of every row but DDPM")
    args = parser.parse_args(argv)

    engine = Engine(args.checkpoints, args.diffusion, args.device, args.precision, max_batch=args.batch,
                    compile_mode=args.compile)
    info = engine.student_info()
    if info is None:
        sys.exit(f"bench.student: model {engine.version} has no distilled student under {args.checkpoints} "
                 f"(python -m training distill --teacher {engine.version})")
    student_steps = [int(s) for s in args.student_steps.split(",")]
    for steps in student_steps:  # refused before DDPM 1000's long run
        if (problem := info.steps_problem(steps)) is not None:
            sys.exit(f"bench.student: {problem}")
    results = measure_all(engine, rows_to_measure(student_steps, engine.model.sampling.guidance_scale), args)
    payload = {"model": engine.version, "student": info.version, "precision": str(engine.dtype).removeprefix("torch."),
               "compile": args.compile, "batch": args.batch, "results": results}
    save("student", payload, table(results, info.version, args.batch, args.latency))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
