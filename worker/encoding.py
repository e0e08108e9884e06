"""A finished job's files: its PNG grid, each image alone as a PNG (both with provenance), and its GIF.

Returns ``{artifact kind: Artifact}`` (kinds of ``facegen.contract.spec.artifact_key``); where they are stored is the
caller's business, so every kind goes through the same store.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from facegen.contract.artifacts import Artifact
from facegen.contract.spec import ARTIFACT_MEDIA_TYPES, JobSpec, image_kind
from facegen.model.imaging import gif_bytes, grid_image, png_bytes

from .engine import RequestOutput
from .provenance import ModelIdentity, parameters, png_text


def encode_artifacts(job_id: str, spec: JobSpec, output: RequestOutput, resolved: dict[str, Any],
                     model: ModelIdentity) -> dict[str, Artifact]:
    """``output.images uint8 [count, 3, H, W]`` as the grid (an edit's: the pair [``output.source`` | edit]) and
    ``count`` single PNGs, ``output.frames`` as the GIF when the job asked for one (trajectory or transition)."""
    indices = [spec.first_index + k for k in range(spec.count)]
    png, gif = ARTIFACT_MEDIA_TYPES["grid"], ARTIFACT_MEDIA_TYPES["animation"]
    tiles = output.images if output.source is None else torch.cat([output.source, output.images])  # edit: [in | out]
    encoded = {"grid": Artifact(png_bytes(grid_image(tiles),
                                          png_text(parameters(job_id, spec, resolved, model, indices))), png)}
    pixels = output.images.permute(0, 2, 3, 1).cpu().numpy()  # [count, H, W, 3]
    for k, index in enumerate(indices):
        encoded[image_kind(k)] = Artifact(png_bytes(Image.fromarray(pixels[k]),
                                                    png_text(parameters(job_id, spec, resolved, model, index))), png)
    if spec.has_animation():
        encoded["animation"] = Artifact(gif_bytes(output.frames, spec.animation_fps), gif)
    return encoded
