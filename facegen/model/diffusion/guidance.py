"""Classifier-free guidance (Ho & Salimans 2022) around a conditional denoiser, and its distilled form: a student
whose network takes the guidance scale as an input (``facegen.model.networks.unet``, guidance embedding)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..chroma import chroma_part
from .samplers import ModelFn


def null_labels(labels: torch.Tensor, null_label: int) -> torch.Tensor:
    """The unconditional labels for a batch: every attribute set to the config's null label."""
    return torch.full_like(labels, null_label)


def guided(unet: nn.Module, labels: torch.Tensor, scale: float | torch.Tensor, null_label: int,
           reference: torch.Tensor | None = None, chroma_projector: torch.Tensor | None = None) -> ModelFn:
    """``(x, t) -> ref + scale * (cond - ref)``; the conditional and reference passes share one batch.

    ``labels [N, A]`` in {0, 1}. ``reference [N, A]``: the condition guided away from (default: the null labels,
    i.e. the unconditional model; an edit passes the source's labels so that guidance pushes along the difference
    between source and target alone). ``scale``: one for the batch, or ``[N]``, one per row (always two passes);
    a float ``scale = 1`` is the plain conditional model (one pass), ``scale = 0`` the reference one.

    ``chroma_projector [C, C]`` (``facegen.model.chroma.chroma_projector``): the part ``P (cond - ref)`` of the
    difference that changes the decoded chroma is taken once, not ``scale`` times: ``ref + (cond - ref) + (scale -
    1) (I - P)(cond - ref)``, so guidance extrapolates shape and luminance and the colours stay the conditional
    prediction's.
    """
    per_row = isinstance(scale, torch.Tensor)
    if not per_row and scale == 1.0:
        return lambda x, t: unet(x, t, labels)
    reference = null_labels(labels, null_label) if reference is None else reference
    if not per_row and scale == 0.0:
        return lambda x, t: unet(x, t, reference)
    both_labels = torch.cat([labels, reference])

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, ref = unet(torch.cat([x, x]), torch.cat([t, t]), both_labels).chunk(2)
        row_scale = scale.view(-1, *(1,) * (x.dim() - 1)) if per_row else scale
        difference = cond - ref
        if chroma_projector is None:
            return ref + row_scale * difference
        colour = chroma_part(chroma_projector, difference)
        return ref + row_scale * (difference - colour) + colour

    return model_fn


def distilled_guidance(student: nn.Module, labels: torch.Tensor, scale: float, null_label: int,
                       guidance_range: tuple[float, ...],
                       landing: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ModelFn:
    """``(x, t) -> student(x, t, labels, guidance=scale)``: one row per image, the scale an input of the network;
    a jump student's also ``target=landing(t)``, the timestep each row's step lands on
    (``ConsistencySampler.landing_timesteps``).

    ``labels [N, A]``. ``scale = 0`` (the reference pass alone, as in :func:`guided`) is the student's output under
    the null labels at ``guidance_range[0]``, the low end of the scales it was distilled on: its teacher's guided
    step under null labels is the unconditional one whatever the scale. Other scales outside ``guidance_range``
    extrapolate what it learnt."""
    if scale == 0.0:
        labels, scale = null_labels(labels, null_label), guidance_range[0]
    w = torch.full((labels.shape[0],), float(scale), device=labels.device)
    if landing is None:
        return lambda x, t: student(x, t, labels, guidance=w)
    return lambda x, t: student(x, t, labels, guidance=w, target=landing(t))
