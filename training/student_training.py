"""What every distillation method shares (``training.distill``, ``training.trajectories``): the loss, the
learning-rate schedule, the draws of open labels and guidance scales, and the update of one iteration."""

from __future__ import annotations

import torch
from torch import nn

from facegen.model.config import ConsistencyConfig, DistillConfig

from .trainer import Trainer


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """The mean over rows of ``sqrt(||prediction - target||^2 + c^2) - c``, the norm over each row's ``[C, H, W]``
    (both ``[N, C, H, W]``): squared-error-like within ``c`` of the target, a plain distance beyond it."""
    distance = (prediction - target).flatten(1).pow(2).sum(1)
    return ((distance + c * c).sqrt() - c).mean()


def learning_rate(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then constant (a time budget may end the run at any step)."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def open_labels(labels: torch.Tensor, null_label: int, cfg: DistillConfig, generator: torch.Generator
                ) -> torch.Tensor:
    """A copy of ``labels int64 [N, A]`` with some left open, as requests leave them: each attribute null with
    ``cfg.attribute_dropout`` (drawn only when it is above 0), then whole rows with ``cfg.label_dropout``."""
    labels = labels.clone()
    if cfg.attribute_dropout > 0:
        labels[torch.rand(labels.shape, generator=generator) < cfg.attribute_dropout] = null_label
    labels[torch.rand(len(labels), generator=generator) < cfg.label_dropout] = null_label
    return labels


def guidance_draws(count: int, consistency: ConsistencyConfig, generator: torch.Generator) -> torch.Tensor:
    """``float32 [count]`` guidance scales uniform in the student's ``consistency.guidance_range``."""
    low, high = consistency.guidance_range
    return low + (high - low) * torch.rand(count, generator=generator)


class StudentStep:
    """The part of one distillation iteration every method shares: :meth:`update` with the iteration's loss."""

    def __init__(self, student: nn.Module, cfg: DistillConfig, trainer: Trainer):
        self.student, self.cfg, self.trainer = student, cfg, trainer
        self.loss_avg: float | None = None  # a moving average of the loss, recorded in the student's manifest

    def update(self, step: int, loss: torch.Tensor) -> dict[str, float]:
        """Step the student's optimiser at iteration ``step``'s learning rate on ``loss`` (a scalar); returns the
        scalars to log."""
        lr = learning_rate(step, self.cfg)
        for group in self.trainer.optimizers["model"].param_groups:
            group["lr"] = lr
        self.trainer.optimizer_step("model", loss, self.student.parameters(), self.cfg.grad_clip)
        value = loss.item()
        self.loss_avg = value if self.loss_avg is None else 0.98 * self.loss_avg + 0.02 * value
        return {"loss": value, "loss_avg": self.loss_avg, "lr": lr}
