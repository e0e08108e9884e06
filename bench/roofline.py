"""Roofline: how much of this machine's measured peak the denoiser reaches.

FLOPs of one guided denoiser evaluation are counted with ``torch.utils.flop_counter`` (convolutions, matmuls,
attention); the achieved rate is FLOPs x steps / wall time of the worker's sampling at each batch size. The peak
is measured in the same run: the best of a large matmul and a large 3x3 convolution in each precision.

    python -m bench.roofline                       # CPU: fp32 and bf16, batch 1..64
    python -m bench.roofline --device cuda --precisions fp16,bf16,fp32 --batches 1,16,64,256
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.common import markdown_table, model_arguments, save, timed
from facegen.model.device import pick_device, pick_dtype
from facegen.model.diffusion.guidance import guided
from facegen.model.diffusion.noise import ImageNoise
from facegen.model.diffusion.samplers import make_sampler, run_chain
from facegen.model.pipeline import LatentDiffusion
from worker.engine import compile_for_inference


def peak_flops(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """FLOP/s of a square matmul and of a 3x3 convolution big enough to saturate the device."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    matmul_s = timed(lambda: a @ b, device, repeat=5, min_total_s=1.0)
    batch = 64 if device.type == "cuda" else 16
    x = torch.randn(batch, 256, 32, 32, device=device, dtype=dtype)
    w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype)
    conv_s = timed(lambda: F.conv2d(x, w, padding=1), device, repeat=5, min_total_s=1.0)
    conv_flops = 2 * batch * 256 * 256 * 9 * 32 * 32
    return {"matmul": 2 * n**3 / matmul_s, "conv3x3": conv_flops / conv_s}


def denoiser_flops(model: LatentDiffusion, batch: int, guidance: float) -> int:
    """FLOPs of one guided denoiser evaluation for ``batch`` images (two UNet rows per image with guidance)."""
    labels = torch.ones(batch, len(model.attributes), dtype=torch.long, device=model.device)
    fn = guided(model.unet, labels, guidance, model.unet.config.null_label)
    x = torch.randn(batch, *model.latent_shape, device=model.device, dtype=model.dtype)
    t = torch.full((batch,), 500, device=model.device, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(x, t)
    return counter.get_total_flops()


def chain_seconds(model: LatentDiffusion, unet: torch.nn.Module, batch: int, steps: int, guidance: float) -> float:
    """Median seconds of a guided DPM-Solver++ chain of ``steps`` for ``batch`` images (no decoding)."""
    labels = torch.ones(batch, len(model.attributes), dtype=torch.long, device=model.device)
    model_fn = guided(unet, labels, guidance, model.unet.config.null_label)
    sampler = make_sampler("dpmpp", model.schedule, model.manifest.latent_clip)
    pairs = [(0, i) for i in range(batch)]

    def chain() -> None:
        with torch.no_grad():
            run_chain(lambda x, t: model_fn(x.to(model.dtype), t), sampler, steps, ImageNoise(pairs, model.device),
                      model.latent_shape)

    return timed(chain, model.device, repeat=3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps per timed chain")
    parser.add_argument("--compile", default="off,default", help="comma-separated torch.compile modes (off = eager)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)

    rows, records, peaks = [], [], {}
    for precision in args.precisions.split(","):
        dtype = pick_dtype(device, precision)
        peaks[precision] = peak_flops(device, dtype)
        peak = max(peaks[precision].values())
        model = LatentDiffusion.load(args.checkpoints, args.model, device, dtype)
        guidance = model.sampling.guidance_scale
        eager_unet = model.unet
        for mode, batch in itertools.product(args.compile.split(","), (int(b) for b in args.batches.split(","))):
            flops = denoiser_flops(model, batch, guidance)
            unet = eager_unet if mode == "off" else compile_for_inference(eager_unet, mode, device)
            seconds = chain_seconds(model, unet, batch, args.steps, guidance)
            achieved = flops * args.steps / seconds
            records.append({"precision": precision, "compile": mode, "batch": batch, "gflop_per_step": flops / 1e9,
                            "achieved_gflops": achieved / 1e9, "peak_gflops": peak / 1e9,
                            "fraction_of_peak": achieved / peak})
            rows.append([precision, mode, batch, flops / 1e9, achieved / 1e9, peak / 1e9, f"{100 * achieved / peak:.1f}%"])
            print(rows[-1], flush=True)
        del model
    peak_rows = [[p, v["matmul"] / 1e9, v["conv3x3"] / 1e9] for p, v in peaks.items()]
    table = (markdown_table(["precision", "compile", "batch", "GFLOP / denoiser step", "achieved GFLOP/s", "peak GFLOP/s",
                             "of peak"], rows)
             + "\n\nMeasured peak (GFLOP/s):\n\n" + markdown_table(["precision", "matmul", "3x3 conv"], peak_rows))
    save("roofline", {"device": str(device), "steps": args.steps, "peaks_flops": peaks, "results": records}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
