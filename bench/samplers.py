"""Sampler throughput: images/s of the worker's own ``Engine.run`` (denoising + VAE decode) by sampler, steps,
batch size, precision and ``torch.compile`` mode, on the bundled model (or ``--checkpoints``/``--model``).

    python -m bench.samplers                                  # CPU: fp32 vs bf16, batch 1..64, every sampler
    python -m bench.samplers --device cuda --precisions fp16,bf16,fp32 --compile off,max-autotune --batches 1,16,64,256

Every row is a measured run (median of ``--repeat`` after a warm-up); DDPM 1000 is measured at the batch sizes of
``--ddpm-batches`` only (it is 50x the work of the default sampler).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from bench.common import markdown_table, model_arguments, save, timed
from worker.engine import Engine, ImageRequest

SAMPLERS = [("dpmpp", 20), ("dpmpp", 10), ("ddim", 50), ("ddim", 20), ("ddpm", 1000)]


def run_once(engine: Engine, batch: int, sampler: str, steps: int, guidance: float) -> None:
    half = batch // 2
    requests = [ImageRequest("smiling", {"Smiling": True}, 1, batch - half),
                ImageRequest("not-smiling", {"Smiling": False}, 2, half)] if half else \
        [ImageRequest("smiling", {"Smiling": True}, 1, batch)]
    engine.run(requests, sampler, steps, guidance)


def measure(engine: Engine, batch: int, sampler: str, steps: int, guidance: float, repeat: int) -> float:
    """Images per second for one ``Engine.run`` of ``batch`` images."""
    seconds = timed(lambda: run_once(engine, batch, sampler, steps, guidance), engine.device,
                    repeat=repeat if sampler != "ddpm" else 1, warmup=1 if sampler != "ddpm" else 0)
    return batch / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--compile", default="off", help="comma-separated torch.compile modes (off = eager)")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--ddpm-batches", default="1,16")
    parser.add_argument("--samplers", default=",".join(f"{s}:{n}" for s, n in SAMPLERS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--name", default="samplers", help="results file name under bench/results/")
    args = parser.parse_args(argv)

    batches = [int(b) for b in args.batches.split(",")]
    ddpm_batches = {int(b) for b in args.ddpm_batches.split(",") if b}
    samplers = [(name, int(steps)) for name, steps in (s.split(":") for s in args.samplers.split(","))]
    rows: list[list[Any]] = []
    records = []
    for precision in args.precisions.split(","):
        for mode in args.compile.split(","):
            engine = Engine(args.checkpoints, args.model, args.device, precision, max_batch=max(batches),
                            compile_mode=mode)
            guidance = engine.model.sampling.guidance_scale
            for sampler, steps in samplers:
                for batch in batches:
                    if sampler == "ddpm" and batch not in ddpm_batches:
                        continue
                    rate = measure(engine, batch, sampler, steps, guidance, args.repeat)
                    step_ms = 1000 * batch / rate / steps / batch
                    records.append({"precision": precision, "compile": mode, "sampler": sampler, "steps": steps,
                                    "batch": batch, "images_per_s": rate, "ms_per_image_step": step_ms})
                    rows.append([precision, mode, f"{sampler} {steps}", batch, rate, step_ms])
                    print(f"{precision:5} {mode:14} {sampler:6}{steps:5} batch {batch:4}: {rate:8.2f} images/s",
                          flush=True)
            del engine
            if args.device == "cuda":
                torch.cuda.empty_cache()
    table = markdown_table(["precision", "compile", "sampler", "batch", "images/s", "ms / image-step"], rows)
    save(args.name, {"guidance": guidance, "results": records}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
