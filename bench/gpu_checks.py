"""Checks of the serving path on the GPU, beside the throughput tables (``bench/gpu.sh`` runs them): images are
compared, not timed, except for the compile check.

- ``invariance``: the same (seed, index) at batch 1, 8 and 32 gives the same pixels (the worker's precision).
- ``precision``: PSNR of the worker's precision (fp16 on CUDA) against fp32 on the same seeds.
- ``fallback``: a UNet made to overflow in one row takes the precision fallback and the run still finishes; plus
  the fallbacks every other check's runs took on their own.
- ``memory``: peak device memory of one run at each batch size.
- ``sync``: a sampling chain under ``torch.cuda.set_sync_debug_mode("error")``: any host sync inside the loop fails.
- ``compile``: compile seconds per bucket (``Engine.warm_up``), graphs compiled by jobs afterwards (0 expected),
  compiled vs eager images/s and pixel difference.

Results are written to ``bench/results/<--name>.json`` after every check (a timeout keeps what was done).

    python -m bench.gpu_checks --device cuda
    python -m bench.gpu_checks --device cpu --checks invariance,fallback --batches 1,2,4 --steps 4   # CPU smoke
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from bench.common import markdown_table, model_arguments, save, timed, write
from facegen.model.diffusion.noise import ImageNoise
from worker.engine import Engine, ImageRequest, RunStats


class OverflowingRow(torch.nn.Module):
    """The UNet with output row 0 set to +Inf (an fp16 overflow, on purpose)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.unet(x, t, labels).clone()
        out[0] = math.inf
        return out


class Checks:
    """One engine in the worker's precision, shared by the checks; results accumulate in ``self.results``."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.engine = Engine(args.checkpoints, args.model, args.device, args.precision, max_batch=args.max_batch)
        self.cuda = self.engine.device.type == "cuda"
        self.fallbacks: Counter[str] = Counter()  # taken unprovoked, over every run of every check
        self.results: dict[str, Any] = {"dtype": str(self.engine.dtype), "steps": args.steps,
                                        "fallbacks_unprovoked": self.fallbacks}

    def generate(self, engine: Engine, count: int, seed: int = 1) -> tuple[torch.Tensor, RunStats]:
        """``uint8 [count, 3, H, W]``: images ``0..count-1`` of one smiling request with ``seed``."""
        requests = [ImageRequest("s", {"Smiling": True}, seed, count)]
        outputs, stats = engine.run(requests, "dpmpp", self.args.steps, engine.model.sampling.guidance_scale)
        if engine is self.engine:
            self.fallbacks.update(stats.precision_fallbacks)
        return outputs["s"].images, stats

    def invariance(self) -> dict[str, Any]:
        batches = sorted(int(b) for b in self.args.batches.split(","))
        largest, _ = self.generate(self.engine, batches[-1])
        rows = {}
        for batch in batches[:-1]:
            images, _ = self.generate(self.engine, batch)
            difference = (images.int() - largest[:batch].int()).abs()
            rows[batch] = {"identical": bool(difference.max() == 0), "max_abs_diff": int(difference.max())}
        return {"against_batch": batches[-1], "batches": rows, "identical": all(r["identical"] for r in rows.values())}

    def precision(self) -> dict[str, Any]:
        count = int(self.args.batches.split(",")[-1])
        fast, _ = self.generate(self.engine, count, seed=2)
        reference = Engine(self.args.checkpoints, self.args.model, self.args.device, "fp32", self.args.max_batch)
        exact, _ = self.generate(reference, count, seed=2)
        del reference
        mse = (fast.float() - exact.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnr = 10 * torch.log10(255.0**2 / mse)
        return {"against": "fp32", "images": count, "psnr_db_mean": float(psnr.mean()), "psnr_db_min": float(psnr.min())}

    def fallback(self) -> dict[str, Any]:
        clean, _ = self.generate(self.engine, 4, seed=3)
        eager = self.engine.denoiser
        self.engine.denoiser = OverflowingRow(eager)
        try:
            start = time.perf_counter()
            images, stats = self.generate(self.engine, 4, seed=3)
            seconds = time.perf_counter() - start
        finally:
            self.engine.denoiser = eager
        self.fallbacks.subtract(stats.precision_fallbacks)  # provoked: not among the unprovoked ones
        return {"provoked": dict(stats.precision_fallbacks), "seconds": seconds,
                "other_rows_identical": bool(torch.equal(images[1:], clean[1:])),
                "redone_row_mean_abs_diff": float((images[0].float() - clean[0].float()).abs().mean()),
                "fallback_dtypes": [str(d) for d in self.engine.fallback_dtypes()]}

    def memory(self) -> dict[str, Any]:
        if not self.cuda:
            return {"skipped": "not CUDA"}
        peaks = {}
        for batch in (int(b) for b in self.args.memory_batches.split(",")):
            self.engine.max_batch = batch
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.engine.device)
            self.generate(self.engine, batch)
            peaks[batch] = torch.cuda.max_memory_allocated(self.engine.device)
        self.engine.max_batch = self.args.max_batch
        return {"peak_bytes_by_batch": peaks}

    def sync(self) -> dict[str, Any]:
        if not self.cuda:
            return {"skipped": "not CUDA"}
        model, found = self.engine.model, {}
        labels = model.labels_for({"Smiling": True}).expand(8, -1).to(self.engine.device)
        for sampler in ("dpmpp", "ddpm"):
            model.sample_latents(labels, ImageNoise([(0, i) for i in range(8)], self.engine.device), sampler, 4, 3.0)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                model.sample_latents(labels, ImageNoise([(0, i) for i in range(8)], self.engine.device), sampler,
                                     self.args.steps, 3.0)
                found[sampler] = "no host sync"
            except RuntimeError as exc:
                found[sampler] = f"host sync: {str(exc).splitlines()[0][:300]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return {"chains": found, "sync_free": all(v == "no host sync" for v in found.values())}

    def compile(self) -> dict[str, Any]:
        import torch._dynamo.utils as dynamo_utils

        args, record = self.args, {"mode": self.args.compile_mode}
        start = time.perf_counter()
        engine = Engine(args.checkpoints, args.model, args.device, args.precision, args.max_batch, args.compile_mode)
        record["load_s"], record["bucket_compile_s"] = time.perf_counter() - start, {}

        def on_bucket(rows: int, seconds: float) -> None:  # keep each bucket's figure even if the stage times out
            record["bucket_compile_s"][rows] = seconds
            self.results["compile"] = record
            write(args.name, self.results)

        engine.warm_up(on_bucket)
        graphs = dynamo_utils.counters["stats"]["unique_graphs"]
        sizes = sorted({1, 3, 5, args.max_batch // 2 + 1, args.max_batch})
        compiled = {n: self.generate(engine, n, seed=4)[0] for n in sizes}
        record["graphs_compiled_by_jobs"] = dynamo_utils.counters["stats"]["unique_graphs"] - graphs
        eager = self.generate(self.engine, args.max_batch, seed=4)[0]
        record["max_abs_diff_vs_eager"] = int((compiled[args.max_batch].int() - eager.int()).abs().max())
        record["images_per_s"] = {}
        for batch in (1, args.max_batch):
            for name, which in (("eager", self.engine), ("compiled", engine)):
                seconds = timed(lambda w=which, b=batch: self.generate(w, b), which.device, repeat=3)
                record["images_per_s"][f"{name}@{batch}"] = batch / seconds
        return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--precision", default="auto", help="the worker's (auto: fp16 on CUDA; bf16 on CPUs with native bf16, else fp32)")
    parser.add_argument("--checks", default="invariance,precision,fallback,memory,sync,compile")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes compared for invariance (last: reference)")
    parser.add_argument("--memory-batches", default="1,32,64,256")
    parser.add_argument("--max-batch", type=int, default=32, help="MAX_BATCH of the engines (buckets up to 2x)")
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps per run")
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--name", default="gpu_checks", help="results file name under bench/results/")
    args = parser.parse_args(argv)

    checks = Checks(args)
    table: list[list[Any]] = []
    for name in args.checks.split(","):
        check: Callable[[], dict[str, Any]] = getattr(checks, name)
        start = time.perf_counter()
        checks.results[name] = check()
        checks.results[name]["check_s"] = time.perf_counter() - start
        write(args.name, checks.results)
        table.append([name, checks.results[name]])
        print(name, checks.results[name], flush=True)
    save(args.name, checks.results, markdown_table(["check", "result"], table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
