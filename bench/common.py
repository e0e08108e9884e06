"""What every benchmark shares: a description of the machine, a timer, and writing results as JSON + Markdown."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# where results go: bench/results/, or $BENCH_RESULTS (bench/gpu.sh keeps its run apart in bench/results/gpu/)
RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict[str, Any]:
    """CPU model, cores, accelerator and library versions of the machine running the benchmark."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags naming the model and where it runs, shared by the model benchmarks."""
    from facegen.model.checkpoints import BUNDLED_CHECKPOINTS

    parser.add_argument("--checkpoints", default=str(BUNDLED_CHECKPOINTS))
    parser.add_argument("--model", default="latest", help="diffusion checkpoint version")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def sync(device: Any) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: Any = "cpu", repeat: int = 3, warmup: int = 1,
          min_total_s: float = 0.0) -> float:
    """Median wall seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs (more runs until the measured
    runs add up to ``min_total_s``)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < repeat or sum(times) < min_total_s:
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write(name: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Write ``bench/results/<name>.json`` (with the machine and the command; atomically, so a benchmark killed
    by its timeout leaves the last complete file); returns the record."""
    import sys

    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "machine": machine(), "command": "python -m bench." + name + " " + " ".join(sys.argv[1:]),
              "at": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)
    return record


def save(name: str, payload: dict[str, Any], markdown: str) -> Path:
    """:func:`write` the results and print the Markdown."""
    record = write(name, payload)
    print(f"\n## {name}\n\n`{record['command'].strip()}` on {record['machine']}\n\n{markdown}\n")
    return RESULTS / f"{name}.json"
