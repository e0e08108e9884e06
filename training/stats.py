"""Success rates with their uncertainty: 95% Wilson intervals (trainers report held-out rates with them too)."""

from __future__ import annotations

import math
from typing import Any

import torch

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial rate ``successes / n`` (95% by default); ``(nan, nan)`` when n = 0.

    Unlike the normal approximation it stays inside [0, 1] and keeps its coverage near 0% and 100%."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: no rounding residue at 0% and 100%
    return low, 1.0 if successes == n else min(1.0, centre + half)


def rate(hits: torch.Tensor) -> dict[str, Any]:
    """A success rate with its 95% Wilson interval: ``{"rate", "low", "high", "n"}`` from a bool/0-1 tensor."""
    n, k = hits.numel(), int(hits.sum())
    low, high = wilson_interval(k, n)
    return {"rate": k / n if n else float("nan"), "low": low, "high": high, "n": n}


def percent_ci(entry: dict[str, Any]) -> str:
    """A :func:`rate` as ``"12.5% [9.1, 16.9]"`` (percent, its 95% interval)."""
    return f"{100 * entry['rate']:.1f}% [{100 * entry['low']:.1f}, {100 * entry['high']:.1f}]"
