"""The worker's side of an edit job: the uploaded face as the engine takes it, and how far an edit goes.

The API sends an RGB PNG already checked and bounded (service/uploads.py); here it is decoded again (a job spec is
data, not trust) and framed the way training frames CelebA (``training.data.celeba.face_crop``).
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from facegen.contract.spec import EDIT_MAX_SIDE, EditSpec, JobSpec
from facegen.model.config import DataConfig
from facegen.model.diffusion.inversion import inversion_depth
from facegen.model.imaging import face_crop

from .engine import EditRequest


def decode_face(png: bytes, data: DataConfig) -> torch.Tensor:
    """An edit's PNG -> ``uint8 [3, S, S]`` cropped and resized like the training images.

    Raises ``ValueError`` when the bytes are not a single RGB image within ``EDIT_MAX_SIDE`` (the API never sends
    one; a hand-made job could)."""
    try:
        with Image.open(io.BytesIO(png)) as image:
            if image.format != "PNG" or image.mode != "RGB" or max(image.size) > EDIT_MAX_SIDE or min(image.size) < 1:
                raise ValueError(f"edit image must be an RGB PNG of at most {EDIT_MAX_SIDE}px a side")
            image.load()
            return torch.from_numpy(face_crop(image, data))
    except OSError as exc:
        raise ValueError(f"edit image cannot be decoded ({exc})") from None


def edit_request(job_id: str, spec: EditSpec, face: torch.Tensor) -> EditRequest:
    return EditRequest(job_id, spec.attributes, spec.seed, face, spec.animation_frames if spec.animation else 0)


def progress_total(spec: JobSpec, steps: int) -> int:
    """Denoiser steps a job's progress counts, given its resolved ``steps``: the chain's steps, or an edit's inversion
    plus regeneration steps."""
    return 2 * inversion_depth(spec.strength, steps) if isinstance(spec, EditSpec) else steps
