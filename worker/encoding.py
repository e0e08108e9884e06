"""A finished job's files: its PNG grid, each image alone as a PNG (both with provenance), and its GIF.

Returns ``{artifact kind: bytes}`` (kinds of ``worker.spec.artifact_key``); where they are stored is the caller's
business, so every kind goes through the same store.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from training.imaging import gif_bytes, grid_image, png_bytes

from .engine import RequestOutput
from .provenance import ModelIdentity, parameters, png_text
from .spec import JobSpec, image_kind


def encode_artifacts(job_id: str, spec: JobSpec, output: RequestOutput, resolved: dict[str, Any],
                     model: ModelIdentity) -> dict[str, bytes]:
    """``output.images uint8 [count, 3, H, W]`` as the grid and ``count`` single PNGs, ``output.frames`` as the GIF
    when the job asked for one (trajectory or transition)."""
    indices = [spec.first_index + k for k in range(spec.count)]
    encoded = {"grid": png_bytes(grid_image(output.images),
                                 png_text(parameters(job_id, spec, resolved, model, indices)))}
    pixels = output.images.permute(0, 2, 3, 1).cpu().numpy()  # [count, H, W, 3]
    for k, index in enumerate(indices):
        encoded[image_kind(k)] = png_bytes(Image.fromarray(pixels[k]),
                                           png_text(parameters(job_id, spec, resolved, model, index)))
    if spec.has_animation():
        encoded["animation"] = gif_bytes(output.frames, spec.animation_fps)
    return encoded
