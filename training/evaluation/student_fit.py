"""``python -m training student-fit``: how closely a jump student of trajectory consistency (``training.trajectories``)
follows its teacher's chains, on chains it learnt from and on chains it never saw.

Both sets are drawn as the student's bank was (its ``DistillConfig``: labels, guidance scales, skeleton): the first
``chains`` of its own bank, and as many from the seed after its own, which no run of it read. For each step of the
sampler's ``n``-step chains (``n = 1..max_steps``, :func:`~facegen.model.diffusion.consistency.jump_steps`) the
result is the loss of the training step (pseudo-Huber, ``huber_c``) of the student's jump from the teacher's state,
averaged over the chains. A student that has learnt its chains by heart shows a low loss on the first set and a high
one on the second; a student that generalises shows the two close. Both banks are kept under ``cache/trajectories``
beside the runs' own, so a second measurement solves no chain again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from facegen.model.config import ConsistencyConfig
from facegen.model.diffusion.consistency import jump_steps
from facegen.model.diffusion.schedule import NoiseSchedule
from facegen.model.networks.unet import UNet
from facegen.model.pipeline import LatentDiffusion
from training.distill import TRAJECTORY_METHOD
from training.trajectories import Tensors, bank_folder, bank_jumps, chain_rows, fill_bank, student_loss

CHAIN_SETS = ("trained on", "never seen")
BATCH = 256  # chains per forward pass


@torch.no_grad()
def jump_losses(student: UNet, bank: Tensors, schedule: NoiseSchedule, consistency: ConsistencyConfig, huber_c: float,
                device: torch.device, dtype: torch.dtype) -> list[float]:
    """The mean loss over ``bank``'s chains of each of ``jump_steps(consistency.skeleton_steps,
    consistency.max_steps)``, in that order: the pseudo-Huber distance of the student's ``f`` at the jump's start
    (the teacher's state) from the ``x0`` that lands on the teacher's state at the jump's end."""
    steps = jump_steps(consistency.skeleton_steps, consistency.max_steps)
    count, losses = len(bank["x0"]), []
    for start, landing in bank_jumps(steps, len(bank["timesteps"])).tolist():
        total = 0.0
        for first in range(0, count, BATCH):
            chains = torch.arange(first, min(first + BATCH, count))
            rows = chain_rows(bank, schedule, chains, torch.full_like(chains, start),
                              torch.full_like(chains, landing), jumps=True)
            loss = student_loss(student, schedule, consistency, bank["timesteps"], rows, huber_c, device, dtype)
            total += loss.item() * len(chains)
        losses.append(total / count)
    return losses


def student_fit(checkpoints: Path, version: str, cache: Path, chains: int, device: torch.device,
                dtype: torch.dtype, show_progress: bool = True
                ) -> tuple[dict[str, list[float]], ConsistencyConfig]:
    """``({chain set: losses}, sampling)``: the losses (:data:`CHAIN_SETS`; :func:`jump_losses`' order) of the jump
    student ``version`` on ``chains`` chains of each set, the banks under ``cache/trajectories``, and its sampling.
    A ``ValueError`` for a version that is no jump student of trajectory consistency."""
    student = LatentDiffusion.load(checkpoints, version, device)
    record = student.manifest.distillation
    if record is None or record.method != TRAJECTORY_METHOD or not record.sampling.jumps:
        raise ValueError(f"{version} is no jump student of {TRAJECTORY_METHOD} (--student-jumps true)")
    teacher = LatentDiffusion.load(checkpoints, record.teacher, device, share_vae=student)
    run = student.manifest.training.config
    trained = dataclasses.replace(run, trajectories=min(chains, run.trajectories))
    losses = {}
    for name, cfg in zip(CHAIN_SETS, (trained, dataclasses.replace(trained, seed=trained.seed + 1)), strict=True):
        folder = bank_folder(cache / "trajectories", record.teacher, cfg, record.sampling)
        bank = fill_bank(folder, teacher.unet, teacher.manifest, cfg, record.sampling, device, dtype,
                         teacher.chroma_projector, show_progress)
        losses[name] = jump_losses(student.unet, bank, teacher.schedule, record.sampling, cfg.huber_c, device, dtype)
    return losses, record.sampling


def fit_table(losses: dict[str, list[float]], sampling: ConsistencyConfig) -> str:
    """A Markdown table of :func:`student_fit`'s losses: a row per chain set, a column per step count, the jumps
    of each separated by ``/``."""
    max_steps = sampling.max_steps
    steps = jump_steps(sampling.skeleton_steps, max_steps)
    header = "| chains | " + " | ".join(f"{n} step{'s' * (n > 1)}" for n in range(1, max_steps + 1)) + " |"
    lines = [header, "|" + "---|" * (max_steps + 1)]
    for name, values in losses.items():
        cells = [" / ".join(f"{value:.2f}" for (count, _, _), value in zip(steps, values, strict=True) if count == n)
                 for n in range(1, max_steps + 1)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
