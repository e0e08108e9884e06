"""Training on the GPU through ``torchrun`` (one process, NCCL: the process group, ``device_id``, the object
collective at each save, fp16 loss scaling, CUDA RNG state): a run of ``2k`` steps straight and a run stopped after
``k`` steps and resumed to ``2k`` should export the same weights. Records each run's wall time and exit code,
skipped steps, and the largest weight difference between the two exports (0 = an exact resume; GPU kernels that are
not deterministic can leave a small one).

    python -m bench.ddp_resume --device cuda --steps 4
    python -m bench.ddp_resume --device cpu --steps 2 --unet-base-channels 32   # CPU smoke (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import markdown_table, save, write
from facegen.model.checkpoints import BUNDLED_CHECKPOINTS, load_checkpoint

NAME = "ddp_resume"


def train(args: argparse.Namespace, work: Path, run_dir: str, steps: int) -> dict[str, Any]:
    """One ``torchrun --nproc_per_node 1 -m training diffusion`` run; its exit code, seconds, export and log."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "training", "diffusion", "--data", str(work / "synth"), "--checkpoints", str(work / "ck"),
               "--run-dir", str(work / run_dir), "--device", args.device, "--steps", str(steps),
               "--save-every", str(args.steps), "--log-every", "1", "--batch-size", str(args.batch_size),
               "--unet-base-channels", str(args.unet_base_channels), "--warmup", "1"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    record: dict[str, Any] = {"steps": steps, "exit_code": done.returncode, "seconds": time.perf_counter() - start}
    exported = [line.split()[2] for line in done.stdout.splitlines() if line.startswith("diffusion checkpoint:")]
    if done.returncode or not exported:
        record["error"] = (done.stderr or done.stdout)[-2000:]
        return record
    record["version"] = Path(exported[0]).name
    log = [json.loads(line) for line in (work / run_dir / "log.jsonl").read_text().splitlines()]
    record["last_log"] = log[-1]
    return record


def weight_difference(checkpoints: Path, a: str, b: str) -> float:
    """Largest absolute difference between two exported versions' weights."""
    first, second = (load_checkpoint(checkpoints, "diffusion", v).state_dict for v in (a, b))
    return max(float((first[k].float() - second[k].float()).abs().max()) for k in first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default=str(BUNDLED_CHECKPOINTS), help="copied; its latest VAE is used")
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=4, help="k: steps before the stop; both runs end at 2k")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=96, help="synthetic training images")
    parser.add_argument("--unet-base-channels", type=int, default=64)
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"device": args.device, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(args.checkpoints, work / "ck")  # the new versions are written to a scratch copy
        subprocess.run([sys.executable, "-m", "training", "synth", "--out", str(work / "synth"), "--count",
                        str(args.images), "--workers", str(min(8, os.cpu_count() or 1))], check=True,
                       capture_output=True)
        for name, run_dir, steps in (("straight", "a", 2 * args.steps), ("stopped", "b", args.steps),
                                     ("resumed", "b", 2 * args.steps)):
            results[name] = train(args, work, run_dir, steps)
            write(NAME, results)
        if all("version" in results[n] for n in ("straight", "resumed")):
            results["max_abs_weight_diff"] = weight_difference(work / "ck", results["straight"]["version"],
                                                               results["resumed"]["version"])
    results["ok"] = all(results[n]["exit_code"] == 0 for n in ("straight", "stopped", "resumed"))
    rows = [[n, results[n]["exit_code"], results[n]["seconds"], results[n].get("last_log", {}).get("skipped_steps")]
            for n in ("straight", "stopped", "resumed")]
    save(NAME, results, markdown_table(["run", "exit code", "seconds", "skipped steps"], rows)
         + f"\n\nlargest weight difference straight vs resumed: {results.get('max_abs_weight_diff')}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
