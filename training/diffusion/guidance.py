"""Classifier-free guidance (Ho & Salimans 2022) around a conditional denoiser."""

from __future__ import annotations

import torch
from torch import nn

from .samplers import ModelFn


def null_labels(labels: torch.Tensor, null_label: int) -> torch.Tensor:
    """The unconditional labels for a batch: every attribute set to the config's null label."""
    return torch.full_like(labels, null_label)


def guided(unet: nn.Module, labels: torch.Tensor, scale: float, null_label: int) -> ModelFn:
    """``(x, t) -> uncond + scale * (cond - uncond)``; the conditional and unconditional passes share one batch.

    ``scale = 1`` is the plain conditional model (one pass), ``scale = 0`` the unconditional one.
    ``labels [N, A]`` in {0, 1}.
    """
    if scale == 1.0:
        return lambda x, t: unet(x, t, labels)
    uncond_labels = null_labels(labels, null_label)
    if scale == 0.0:
        return lambda x, t: unet(x, t, uncond_labels)
    both_labels = torch.cat([labels, uncond_labels])

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = unet(torch.cat([x, x]), torch.cat([t, t]), both_labels).chunk(2)
        return uncond + scale * (cond - uncond)

    return model_fn
