"""Distillation speed: the teacher UNet's forward time per row, and iterations/s of ``training.distill``'s loop
(one ``DistillStep``: 2 teacher rows, 1 target row, 1 student row forward and backward per latent), at one batch
size on the bundled model; from those, the iterations a run of ``--minutes`` gives.

    python -m bench.distill                       # CPU, batch 64, the precision the trainer picks (auto)
    python -m bench.distill --device cuda --batch 256

Latents and labels are random (speed does not depend on them), so no dataset is needed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import markdown_table, model_arguments, save, timed
from facegen.model.checkpoints import load_checkpoint
from facegen.model.config import ConsistencyConfig, DistillConfig
from facegen.model.device import autocast
from facegen.model.networks.unet import UNet
from training.distill import DistillStep, student_from_teacher
from training.runtime import EMA, BatchStream, Distributed, start_run
from training.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--minutes", type=float, default=60.0, help="the run length the iteration count is for")
    args = parser.parse_args(argv)

    device, dtype, _ = start_run(args.device, args.precision, None, 0)
    checkpoint = load_checkpoint(args.checkpoints, "diffusion", args.model)
    manifest = checkpoint.manifest
    teacher = UNet(manifest.model)
    teacher.load_state_dict({k: v.float() for k, v in checkpoint.state_dict.items()})
    teacher = teacher.to(device).eval().requires_grad_(False)
    n = args.batch
    x = torch.randn(n, *manifest.latent_shape, device=device)
    t = torch.randint(0, manifest.schedule.timesteps, (n,), device=device)
    labels = torch.ones(n, manifest.model.num_attributes, dtype=torch.long, device=device)

    def forward() -> None:
        with torch.no_grad(), autocast(device, dtype):
            teacher(x, t, labels)

    forward_s = timed(forward, device, repeat=args.repeat)

    student = student_from_teacher(teacher).to(device)
    cfg = DistillConfig(batch_size=n, log_every=10**9, save_every=10**9)
    size = 4 * n
    latents = (torch.randn(size, *manifest.latent_shape), torch.full((size, *manifest.latent_shape), -4.0))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(Path(run_dir), 1, cfg.log_every, cfg.save_every, Distributed(), device, {"model": student},
                          {"model": torch.optim.AdamW(student.parameters(), lr=cfg.lr)}, dtype == torch.float16,
                          BatchStream(size, n, 0), {"noise": torch.Generator().manual_seed(0)},
                          EMA(student, cfg.target_ema_decay))
        step = DistillStep(student, teacher, latents, torch.randint(0, 2, (size, manifest.model.num_attributes)),
                           manifest, ConsistencyConfig(), cfg, trainer, dtype)
        iteration_s = timed(lambda: (step(0), trainer.ema.update(student)), device, repeat=args.repeat)

    per_run = int(args.minutes * 60 / iteration_s)
    payload = {"device": str(device), "precision": str(dtype).removeprefix("torch."), "batch": n,
               "threads": torch.get_num_threads(), "forward_ms_per_row": 1000 * forward_s / n,
               "iteration_s": iteration_s, "iterations_per_s": 1 / iteration_s,
               f"iterations_in_{args.minutes:g}_minutes": per_run,
               "latents_per_run": per_run * n}
    table = markdown_table(["device", "precision", "batch", "UNet forward ms/row", "distill it/s",
                            f"iterations in {args.minutes:g} min"],
                           [[str(device), payload["precision"], n, payload["forward_ms_per_row"], 1 / iteration_s,
                             per_run]])
    save("distill", payload, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
