"""Image grids and GIF animations, for the worker's artifacts and the training visualisations.

Images come in as ``uint8 [N, 3, H, W]``; the outputs are PIL images or encoded file bytes.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .config import DataConfig

GRID_PADDING = 2  # pixels between and around tiles
GRID_BACKGROUND = (255, 255, 255)
FINAL_FRAME_HOLD = 4  # the last GIF frame stays this many frame durations
# CelebA's aligned-and-cropped images: the frame training faces come in, and that uploaded photos are cropped like
IMAGE_WIDTH, IMAGE_HEIGHT = 178, 218


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``float [N, 3, H, W]`` in [-1, 1] (clamped) -> ``uint8`` in 0..255, the form every function below takes."""
    return images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def grid_shape(count: int) -> tuple[int, int]:
    """``(rows, cols)`` for ``count`` tiles: as square as possible, never an empty row."""
    cols = math.ceil(math.sqrt(count))
    return math.ceil(count / cols), cols


def grid_image(images: torch.Tensor, cols: int | None = None) -> Image.Image:
    """Tile ``uint8 [N, 3, H, W]`` row-major into one RGB image with ``GRID_PADDING`` px gaps (``cols`` per row,
    default :func:`grid_shape`)."""
    n, _, h, w = images.shape
    rows, cols = grid_shape(n) if cols is None else (-(-n // cols), cols)
    pad = GRID_PADDING
    canvas = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), GRID_BACKGROUND)
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    for index in range(n):
        r, c = divmod(index, cols)
        canvas.paste(Image.fromarray(array[index]), (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """PNG file bytes; ``text``: ``tEXt`` chunks (keyword -> Latin-1 value), e.g. the worker's provenance."""
    info = PngInfo()
    for keyword, value in (text or {}).items():
        info.add_text(keyword, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def gif_bytes(frames: list[torch.Tensor], fps: int) -> bytes:
    """Looping GIF of grids, one per frame (each ``uint8 [N, 3, H, W]``); the last frame is held longer."""
    images = [grid_image(frame) for frame in frames]
    duration = round(1000 / fps)
    durations = [duration] * (len(images) - 1) + [duration * FINAL_FRAME_HOLD]
    palette_images = [image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
                      for image in images]
    buffer = io.BytesIO()
    palette_images[0].save(buffer, format="GIF", save_all=True, append_images=palette_images[1:], duration=durations,
                           loop=0, disposal=1, optimize=False)
    return buffer.getvalue()


def center_crop_resize(image: Image.Image, side: int, size: int) -> np.ndarray:
    """An RGB image -> ``uint8 [3, size, size]``: its centred ``side x side`` square, resized (bicubic)."""
    w, h = image.size
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((size, size), Image.BICUBIC, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def face_crop(image: Image.Image, config: DataConfig) -> np.ndarray:
    """Any RGB face photo -> ``uint8 [3, S, S]`` framed as training frames CelebA: the centred square whose side is
    the fraction ``config.crop / IMAGE_WIDTH`` of the shorter side (on a 178x218 aligned image exactly
    :func:`load_image`'s crop), resized to ``config.image_size``."""
    side = max(1, round(min(image.size) * config.crop / IMAGE_WIDTH))
    return center_crop_resize(image, side, config.image_size)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, 3, S, S]`` in 0..255 -> ``float32`` in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)
