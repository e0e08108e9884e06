"""The image of POST /edit, checked and bounded in the API process with Pillow alone (no torch here).

:func:`prepare_upload` accepts a PNG, JPEG or WebP file and returns what the worker gets: an 8-bit RGB PNG whose
longest side is at most ``spec.EDIT_MAX_SIDE`` pixels. Every refusal is an :class:`UploadError` carrying its HTTP
status and a one-line reason (the route names the ``image`` field):

- 413: over ``MAX_UPLOAD_PIXELS``, or its decode would hold more than ``UPLOAD_DECODE_MAX_MIB`` (both read from
  the header, before any pixel is decoded: :func:`decode_bytes`), or a decompression bomb by Pillow's own guard
  (``Image.MAX_IMAGE_PIXELS``, its warning treated as an error);
- 415: not an image, or an image in another format (GIF, BMP, TIFF, ...);
- 422: empty, 0 pixels wide or high, animated (more than one frame), truncated or corrupt;
- 503 (from :func:`decode_upload`): ``UPLOAD_DECODE_CONCURRENCY`` decodes were running in this process and none
  ended within ``UPLOAD_DECODE_WAIT_S``; it carries ``Retry-After``.

Documented conversions to 8-bit RGB: the EXIF orientation is applied; transparency (RGBA, LA, palette with a
transparent colour) is composited on ``UPLOAD_BACKGROUND`` (white); 16-bit greyscale keeps its 8 high bits; CMYK,
greyscale, palette and other modes go through Pillow's ``convert("RGB")``; a 16-bit-per-channel RGB PNG is read by
Pillow as 8 bits per channel already.

Memory: no full-size copy of an image is ever made, and only Pillow's decoders of the accepted formats run. A
JPEG is decoded DCT-scaled (``Image.draft``) to a longest side of at least ``REDUCING_GAP x max_side`` (a
progressive one still holds all its DCT coefficients between scans); a PNG or WebP is decoded once at full size in
its stored mode (Pillow has no reduced decode for them; libwebp's canvases come on top). What each holds is
:func:`decode_bytes`, refused over ``UPLOAD_DECODE_MAX_MIB``. Then :func:`reduced_rgb` converts the decoded image
to RGB and reduces it by an integer factor one band of rows at a time, so each conversion touches at most
``BAND_PIXELS`` pixels; the final Lanczos resize and the EXIF orientation work on that reduced image.
bench/upload_memory.py measures what one decode costs the API process.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import warnings
import weakref

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from facegen.contract import spec
from service.config import Settings

log = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
UPLOAD_BACKGROUND = (255, 255, 255)  # what transparent pixels become
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # Pillow's modes for 16-bit greyscale PNGs
SNIFF_BYTES = 16  # as much of a file as Pillow's format checks (``Image.open``'s ``accept``) read
# The decoded image is reduced by an integer factor to a longest side of at least REDUCING_GAP x max_side before
# the Lanczos resize to max_side (as Pillow's ``thumbnail``): box averaging down to 2x, Lanczos for the rest.
REDUCING_GAP = 2
BAND_PIXELS = 1 << 18  # pixels of a full-size image converted to RGB at a time (a band of rows, 1 MiB as RGB)
MIB = 1 << 20
STORED_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}  # Pillow's; 4 in other modes
WEBP_BYTES_PER_PIXEL = 16  # Pillow's image, libwebp's two canvases and the frame's copy, 4 bytes a pixel each
COEFFICIENT_BYTES = 2  # a DCT coefficient, as libjpeg keeps every one of a progressive JPEG between its scans


class UploadError(ValueError):
    """An upload the API refuses: ``status`` is the HTTP status, the message says why; ``retry_after_s`` (seconds)
    when the refusal is the server's load, not the file."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


async def decode_upload(data: bytes, settings: Settings) -> bytes:
    """:func:`prepare_upload` of ``data`` under ``settings``' limits, run in the thread pool, with at most
    ``UPLOAD_DECODE_CONCURRENCY`` decodes at once in this process: a request over it waits up to
    ``UPLOAD_DECODE_WAIT_S`` seconds for one to end, then is refused with 503 (``RETRY_AFTER_S``)."""
    slots = _decode_slots(settings.upload_decode_concurrency)
    all_busy = slots.locked()  # acquire() would wait
    if all_busy:
        log.debug("an upload waits for a decode slot (%d busy)", settings.upload_decode_concurrency)
    try:
        await asyncio.wait_for(slots.acquire(), settings.upload_decode_wait_s if all_busy else None)
    except TimeoutError:
        raise UploadError(503, f"the server is decoding {settings.upload_decode_concurrency} uploads already "
                               "(UPLOAD_DECODE_CONCURRENCY); retry later", settings.retry_after_s) from None
    try:
        return await run_in_threadpool(prepare_upload, data, settings.max_upload_pixels,
                                       max_decode_bytes=settings.upload_decode_max_mib * MIB)
    finally:
        slots.release()


_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary())


def _decode_slots(concurrency: int) -> asyncio.Semaphore:
    """This process's decode slots: one semaphore per event loop (a semaphore is bound to the loop it waits on)
    and configured concurrency."""
    per_loop = _SLOTS.setdefault(asyncio.get_running_loop(), {})
    return per_loop.setdefault(concurrency, asyncio.Semaphore(concurrency))


def prepare_upload(data: bytes, max_pixels: int, max_side: int = spec.EDIT_MAX_SIDE,
                   max_decode_bytes: int | None = None) -> bytes:
    """Check ``data`` (a PNG, JPEG or WebP file) and return it as an RGB PNG with its longest side at most
    ``max_side``; a file whose decode would hold more than ``max_decode_bytes`` (``None``: no limit) is refused.
    Raises :class:`UploadError` (see the module's docstring)."""
    if not data:
        raise UploadError(422, "the file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
                check_header(image, max_pixels, max_decode_bytes)
                size = bounded_size(image.size, max_side)
                return png_bytes(oriented(reduced_rgb(image, max_side).resize(size, Image.LANCZOS), image))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise UploadError(413, f"decompression bomb refused: {exc}") from None
        except UnidentifiedImageError:
            raise unreadable(data) from None
        except (OSError, SyntaxError, ValueError) as exc:
            if isinstance(exc, UploadError):
                raise
            raise UploadError(422, f"the image is truncated or corrupt ({exc})") from None


def unreadable(data: bytes) -> UploadError:
    """The refusal of a file no accepted format's decoder opens, by what its first bytes say it is."""
    if empty_png(data):  # Pillow refuses to open a 0-pixel PNG at all
        return UploadError(422, "the image is a PNG of 0 pixels wide or high: it has no pixels")
    other = sniffed_format(data)
    if other is not None:
        return UploadError(415, f"{other} images are not accepted; send a PNG, JPEG or WebP file")
    return UploadError(415, "not an image Pillow can read; send a PNG, JPEG or WebP file")


def sniffed_format(data: bytes) -> str | None:
    """The Pillow format whose signature ``data`` starts with, by the formats' ``accept`` checks alone (byte
    comparisons: no decoder of those formats runs); ``None`` when none matches."""
    Image.init()
    prefix = data[:SNIFF_BYTES]
    return next((name for name in Image.ID if (accept := Image.OPEN[name][1]) is not None and accept(prefix)), None)


def empty_png(data: bytes) -> bool:
    """Whether ``data`` starts as a PNG whose header (IHDR, the first chunk) declares a width or height of 0."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        return False
    return int.from_bytes(data[16:20], "big") == 0 or int.from_bytes(data[20:24], "big") == 0


def check_header(image: Image.Image, max_pixels: int, max_decode_bytes: int | None = None) -> None:
    """Refuse by what the header says: format, size, frames, the memory its decode would hold."""
    if image.format not in ACCEPTED_FORMATS:  # e.g. MPO, which Pillow's JPEG plugin opens
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
    if max_decode_bytes is not None and (needed := decode_bytes(image)) > max_decode_bytes:
        kind = "progressive JPEG" if image.format == "JPEG" else image.format
        raise UploadError(413, f"decoding this {width}x{height} {kind} would take about {needed / MIB:.0f} MiB, "
                               f"over the {max_decode_bytes / MIB:.0f} MiB one upload may (UPLOAD_DECODE_MAX_MIB); "
                               "send fewer pixels, or a baseline JPEG")


def decode_bytes(image: Image.Image) -> int:
    """About how many bytes decoding ``image`` (opened: its header read) holds at once, from what no reduced
    decode avoids: a PNG's full-size image in its stored mode, a WebP's with libwebp's canvases, a progressive
    JPEG's DCT coefficients (each component at its own sampling). A baseline JPEG, DCT-scaled, holds a few MiB
    whatever its size: 0 here."""
    pixels = image.width * image.height
    if image.format == "WEBP":
        return WEBP_BYTES_PER_PIXEL * pixels
    if image.format == "JPEG":
        if not image.info.get("progressive"):
            return 0
        components = [(h, v) for _, h, v, _ in image.layer]  # (horizontal, vertical) sampling factors
        h_max, v_max = max(h for h, _ in components), max(v for _, v in components)
        return sum(COEFFICIENT_BYTES * math.ceil(image.width * h / h_max) * math.ceil(image.height * v / v_max)
                   for h, v in components)
    return STORED_BYTES_PER_PIXEL.get(image.mode, 4) * pixels


def reduced_rgb(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` (opened, not loaded) decoded and converted to RGB, reduced by the largest integer factor that
    keeps its longest side at least ``REDUCING_GAP x max_side``: a JPEG by DCT scaling as it is decoded, any
    image by box averaging (``Image.reduce``) one band of rows at a time, converted to RGB band by band."""
    reduced_longest = REDUCING_GAP * max_side
    if image.format == "JPEG" and max(image.size) > reduced_longest:
        scale = reduced_longest / max(image.size)
        image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    image.load()
    factor = max(1, max(image.size) // reduced_longest)
    if factor == 1:
        return to_rgb(image)
    band_rows = factor * max(1, BAND_PIXELS // (image.width * factor))
    reduced = Image.new("RGB", (-(-image.width // factor), -(-image.height // factor)))
    for top in range(0, image.height, band_rows):
        band = image.crop((0, top, image.width, min(top + band_rows, image.height)))
        reduced.paste(to_rgb(band).reduce(factor), (0, top // factor))
    return reduced


def oriented(reduced: Image.Image, image: Image.Image) -> Image.Image:
    """``reduced`` turned by the EXIF orientation of ``image`` (the decoded original it was reduced from)."""
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    if orientation is None:
        return reduced
    reduced.getexif()[ExifTags.Base.Orientation] = orientation
    return ImageOps.exif_transpose(reduced)


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


def bounded_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` (width, height) scaled, aspect kept, so its longest side is at most ``max_side``."""
    width, height = size
    if max(size) <= max_side:
        return size
    scale = max_side / max(size)
    return max(1, round(width * scale)), max(1, round(height * scale))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
