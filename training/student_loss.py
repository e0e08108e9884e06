"""The loss and learning-rate schedule every distillation method shares (``training.distill``,
``training.trajectories``)."""

from __future__ import annotations

import torch

from facegen.model.config import DistillConfig


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """The mean over rows of ``sqrt(||prediction - target||^2 + c^2) - c``, the norm over each row's ``[C, H, W]``
    (both ``[N, C, H, W]``): squared-error-like within ``c`` of the target, a plain distance beyond it."""
    distance = (prediction - target).flatten(1).pow(2).sum(1)
    return ((distance + c * c).sqrt() - c).mean()


def learning_rate(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then constant (a time budget may end the run at any step)."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
