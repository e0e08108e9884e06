"""Attribute transitions: a job's images as GIFs whose condition moves from the opposite of each requested
attribute value to it while the noise stays fixed.

The conditions of the frames come from :mod:`facegen.model.transitions` (frame ``f`` of ``F`` is ``f / (F - 1)`` of the
way from the opposite label values to the requested ones; the UNet blends the label vectors) and guidance runs
against the null label as for any image. Every frame of image ``k`` draws all its noise from stream ``(seed, first_index + k)``
with the same sampler and steps, so the frames differ only by the condition: the same person, changing. The last
frame's condition is exactly the request's (``w = 1``), so it is the job's image itself, bit for bit.

Each frame is one engine request over all ``count`` images, so a transition costs ``count * frames`` chains,
batched like any other images.
"""

from __future__ import annotations

import torch

from facegen.contract.spec import JobSpec
from facegen.model.transitions import frame_attributes, frame_weights

from .engine import ImageRequest, RequestOutput


def frame_key(job_id: str, frame: int) -> str:
    return f"{job_id}/transition-{frame}"


def transition_requests(job_id: str, spec: JobSpec) -> list[ImageRequest]:
    """One engine request per frame, source first, each over the job's ``count`` images and noise streams."""
    return [ImageRequest(frame_key(job_id, f), frame_attributes(spec.attributes, weight), spec.seed, spec.count,
                         first_index=spec.first_index)
            for f, weight in enumerate(frame_weights(spec.transition_frames))]


def transition_output(outputs: dict[str, RequestOutput], job_id: str, spec: JobSpec) -> RequestOutput:
    """The job's output from its frames' outputs: images ``uint8 [count, 3, H, W]`` (the last frame: the
    requested condition) and ``frames``, one ``uint8 [count, 3, H, W]`` per frame, source first."""
    frames: list[torch.Tensor] = [outputs[frame_key(job_id, f)].images for f in range(spec.transition_frames)]
    return RequestOutput(frames[-1], frames)
