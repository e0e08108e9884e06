"""The image of POST /edit, checked and bounded in the API process with Pillow alone (no torch here).

:func:`prepare_upload` accepts a PNG, JPEG or WebP file and returns what the worker gets: an 8-bit RGB PNG whose
longest side is at most ``spec.EDIT_MAX_SIDE`` pixels. Every refusal is an :class:`UploadError` carrying its HTTP
status and a one-line reason (the route names the ``image`` field):

- 413: over ``MAX_UPLOAD_PIXELS`` (read from the header, before any pixel is decoded) or a decompression bomb by
  Pillow's own guard (``Image.MAX_IMAGE_PIXELS``, its warning treated as an error);
- 415: not an image, or an image in another format (GIF, BMP, TIFF, ...);
- 422: empty, 0 pixels wide or high, animated (more than one frame), truncated or corrupt.

Documented conversions to 8-bit RGB: the EXIF orientation is applied; transparency (RGBA, LA, palette with a
transparent colour) is composited on ``UPLOAD_BACKGROUND`` (white); 16-bit greyscale keeps its 8 high bits; CMYK,
greyscale, palette and other modes go through Pillow's ``convert("RGB")``; a 16-bit-per-channel RGB PNG is read by
Pillow as 8 bits per channel already.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from facegen.contract import spec

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
UPLOAD_BACKGROUND = (255, 255, 255)  # what transparent pixels become
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # Pillow's modes for 16-bit greyscale PNGs


class UploadError(ValueError):
    """An upload the API refuses: ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def prepare_upload(data: bytes, max_pixels: int, max_side: int = spec.EDIT_MAX_SIDE) -> bytes:
    """Check ``data`` (a PNG, JPEG or WebP file) and return it as an RGB PNG with its longest side at most
    ``max_side``; raises :class:`UploadError` (see the module's docstring)."""
    if not data:
        raise UploadError(422, "the file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=None) as image:
                check_header(image, max_pixels)
                image.load()
                return png_bytes(bounded(to_rgb(ImageOps.exif_transpose(image)), max_side))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UploadError(413, f"decompression bomb refused: {exc}") from None
        except UnidentifiedImageError:
            if empty_png(data):  # Pillow refuses to open a 0-pixel PNG at all
                raise UploadError(422, "the image is a PNG of 0 pixels wide or high: it has no pixels") from None
            raise UploadError(415, "not an image Pillow can read; send a PNG, JPEG or WebP file") from None
        except (OSError, SyntaxError, ValueError) as exc:
            if isinstance(exc, UploadError):
                raise
            raise UploadError(422, f"the image is truncated or corrupt ({exc})") from None


def empty_png(data: bytes) -> bool:
    """Whether ``data`` starts as a PNG whose header (IHDR, the first chunk) declares a width or height of 0."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        return False
    return int.from_bytes(data[16:20], "big") == 0 or int.from_bytes(data[20:24], "big") == 0


def check_header(image: Image.Image, max_pixels: int) -> None:
    """Refuse by what the header says: format, size, frames."""
    if image.format not in ACCEPTED_FORMATS:
        raise UploadError(415, f"{image.format} images are not accepted; send a PNG, JPEG or WebP file")
    width, height = image.size
    if width == 0 or height == 0:
        raise UploadError(422, f"the image is {width}x{height} pixels: it has no pixels")
    if width * height > max_pixels:
        raise UploadError(413, f"the image is {width}x{height} = {width * height} pixels, over the limit of "
                               f"{max_pixels} (MAX_UPLOAD_PIXELS)")
    if getattr(image, "n_frames", 1) > 1:
        raise UploadError(422, f"animated images are not accepted (this one has {image.n_frames} frames); send one "
                               "still image")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, by the conversions the module's docstring lists."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = image.point(lambda value: value / 256).convert("L")  # 0..65535 -> 0..255 (values clip at 255)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*UPLOAD_BACKGROUND, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def bounded(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` downscaled (Lanczos, aspect kept) so its longest side is at most ``max_side``."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.LANCZOS, reducing_gap=3.0)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
