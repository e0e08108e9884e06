"""Single images in the format a client asks for, and the provenance they carry (Pillow only: no torch).

The worker stores each image as a PNG whose ``tEXt`` chunk ``parameters`` holds its provenance JSON
(worker/provenance.py). PNG is served as stored; WebP (lossless: the same pixels) and JPEG (quality
``JPEG_QUALITY``) are converted here and carry the same JSON in their EXIF ``UserComment`` (tag 0x9286, ASCII
character code), where A1111-style readers look for it.
"""

from __future__ import annotations

import io
import json
from enum import StrEnum
from typing import Any

from PIL import ExifTags, Image

from facegen.contract.spec import PROVENANCE_KEY

JPEG_QUALITY = 95
USER_COMMENT_ASCII = b"ASCII\x00\x00\x00"  # EXIF UserComment's 8-byte character-code prefix


class ImageFormat(StrEnum):
    png = "png"
    webp = "webp"
    jpeg = "jpeg"


MEDIA_TYPES = {ImageFormat.png: "image/png", ImageFormat.webp: "image/webp", ImageFormat.jpeg: "image/jpeg"}


def convert(png: bytes, target: ImageFormat) -> bytes:
    """The stored PNG ``png`` in ``target``'s format, its provenance moved to the EXIF UserComment."""
    if target == ImageFormat.png:
        return png
    image = Image.open(io.BytesIO(png))
    image.load()
    exif = Image.Exif()
    text = image.text.get(PROVENANCE_KEY)
    if text is not None:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = USER_COMMENT_ASCII + text.encode("ascii")
    buffer = io.BytesIO()
    if target == ImageFormat.webp:
        image.save(buffer, format="WEBP", lossless=True, exif=exif)
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, exif=exif)
    return buffer.getvalue()


def read_parameters(image: Image.Image) -> dict[str, Any] | None:
    """The provenance JSON an image carries: a PNG's ``parameters`` text chunk, else the EXIF UserComment of a
    WebP/JPEG written by :func:`convert`; ``None`` when it has neither (or they are not a JSON object)."""
    text = getattr(image, "text", {}).get(PROVENANCE_KEY) if image.format == "PNG" else None
    if text is None:
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
        if isinstance(comment, bytes) and comment.startswith(USER_COMMENT_ASCII):
            text = comment[len(USER_COMMENT_ASCII):].decode("ascii", errors="replace")
    try:
        record = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
