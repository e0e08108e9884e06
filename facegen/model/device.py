"""Where and in what precision the model runs: the device, the compute dtype, autocast."""

from __future__ import annotations

import contextlib

import torch

from .config import PRECISIONS

# The dtype of each precision name (compute precisions and checkpoint export dtypes alike).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda was asked for but no CUDA device is available")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU's own instructions (AVX-512 bf16 or AMX) rather than emulating it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_dtype(device: torch.device, precision: str) -> torch.dtype:
    """Compute dtype: ``auto`` is fp16 on CUDA; on CPU bf16 where the CPU runs it natively, fp32 elsewhere.

    With native bf16, bf16 is the precision whose convolutions give each image the same bits whatever batch it
    shares (oneDNN's fp32 kernels change with the batch size), which "same seed, same pixels" and deterministic
    retries rest on; it is also 2.3x fp32 at batch 64 with AMX, 1.45x slower without (BENCHMARKS.md). A CPU with
    only AVX2 emulates bf16: ~17x slower than fp32 there, and not batch-invariant either, so fp32. CPU fp16 is
    ~100x slower."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return DTYPES[precision]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
