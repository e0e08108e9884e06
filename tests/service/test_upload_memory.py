"""An upload's decode never holds a full-size copy of its image (service/uploads.py): every Pillow image the
decode creates is recorded, and at the pixel limit the only full-size one is a PNG's or WebP's own decode in its
stored mode (a JPEG has none: it is DCT-scaled); a file whose decode would hold more than UPLOAD_DECODE_MAX_MIB is
refused before any pixel is decoded; the reduced path gives what decoding at full size would; only the accepted
formats' decoders run; and a process decodes at most UPLOAD_DECODE_CONCURRENCY uploads at once (in-process app,
real Redis)."""

from __future__ import annotations

import io
import logging
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from PIL import ExifTags, Image, ImageChops, ImageOps, ImageStat

from facegen.contract import spec
from service import uploads
from service.config import Settings

SETTINGS = Settings()
SIDE = 5000  # a square at the pixel limit
FULL_PIXELS = SIDE * SIDE
DECODE_LIMIT = SETTINGS.upload_decode_max_mib * uploads.MIB
REDUCED_PIXELS = FULL_PIXELS // 16  # every image a decode creates, except a PNG's or WebP's own, stays under this


@dataclass(frozen=True)
class Created:
    mode: str
    size: tuple[int, int]

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


@pytest.fixture
def created(monkeypatch) -> list[Created]:
    """Every image Pillow creates from here on: decoded files (``Image.core.new``), ``Image.new`` (``core.fill``)
    and every image derived from another (``Image.Image._new``: convert, crop, reduce, resize, composite...)."""
    images: list[Created] = []

    def recording(function: Callable) -> Callable:
        def record(*args, **kwargs):
            result = function(*args, **kwargs)
            core = getattr(result, "im", result)
            images.append(Created(core.mode, core.size))
            return result
        return record

    monkeypatch.setattr(Image.core, "new", recording(Image.core.new))
    monkeypatch.setattr(Image.core, "fill", recording(Image.core.fill))
    monkeypatch.setattr(Image.Image, "_new", recording(Image.Image._new))
    return images


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradients(size: tuple[int, int]) -> Image.Image:
    """RGB: red grows to the right, green downwards, blue from the centre (no two orientations look alike)."""
    horizontal = Image.linear_gradient("L").rotate(90).transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize(size)
    return Image.merge("RGB", (horizontal, Image.linear_gradient("L").resize(size),
                               Image.radial_gradient("L").resize(size)))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def rgb48_png(side: int) -> bytes:
    """A side x side PNG of 16 bits per RGB channel (Pillow cannot write one): a horizontal grey ramp."""
    row = b"\x00" + b"".join(struct.pack(">HHH", *(x * 65535 // side,) * 3) for x in range(side))
    compressor = zlib.compressobj(1)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 16, 2, 0, 0, 0)
    return (uploads.PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def at_the_limit(case: str) -> bytes:
    size = (SIDE, SIDE)
    if case == "JPEG":
        return encoded(gradients(size), "JPEG", quality=85)
    if case == "progressive JPEG":
        return encoded(gradients(size), "JPEG", quality=85, progressive=True)
    if case == "PNG":
        return encoded(gradients(size), "PNG", compress_level=1)
    if case == "PNG with alpha":
        return encoded(Image.merge("RGBA", (*gradients(size).split(), Image.radial_gradient("L").resize(size))),
                       "PNG", compress_level=1)
    if case == "16-bit RGB PNG":
        return rgb48_png(SIDE)
    if case == "16-bit grey PNG":
        return encoded(Image.new("I;16", size, 40_000), "PNG", compress_level=1)
    raise AssertionError(case)


# upload -> the mode of its one full-size decode (None: a JPEG, DCT-scaled, has none)
AT_THE_LIMIT = {"JPEG": None, "progressive JPEG": None, "PNG": "RGB", "PNG with alpha": "RGBA",
                "16-bit RGB PNG": "RGB", "16-bit grey PNG": "I;16"}


@pytest.mark.parametrize("case", list(AT_THE_LIMIT))
def test_an_upload_at_the_pixel_limit_is_never_copied_at_full_size(created, case) -> None:
    data = at_the_limit(case)
    created.clear()
    png = uploads.prepare_upload(data, SETTINGS.max_upload_pixels, max_decode_bytes=DECODE_LIMIT)
    full_size = [image for image in created if image.pixels > REDUCED_PIXELS]
    stored_mode = AT_THE_LIMIT[case]
    assert full_size == ([Created(stored_mode, (SIDE, SIDE))] if stored_mode else []), full_size
    assert max(image.pixels for image in created if image not in full_size) <= REDUCED_PIXELS
    result = Image.open(io.BytesIO(png))
    assert result.mode == "RGB" and result.size == (spec.EDIT_MAX_SIDE, spec.EDIT_MAX_SIDE)


def test_a_webp_at_the_decode_limit_is_decoded_once(created) -> None:
    side = int((DECODE_LIMIT / uploads.WEBP_BYTES_PER_PIXEL) ** 0.5)
    webp = encoded(gradients((side, side)), "WEBP", quality=80)
    created.clear()
    uploads.prepare_upload(webp, SETTINGS.max_upload_pixels, max_decode_bytes=DECODE_LIMIT)
    assert [image for image in created if image.pixels > side * side // 16] == [Created("RGB", (side, side))]


OVER_THE_DECODE_LIMIT = {  # at MAX_UPLOAD_PIXELS, but Pillow would hold more than UPLOAD_DECODE_MAX_MIB
    "WebP": lambda: encoded(gradients((SIDE, SIDE)), "WEBP", quality=80),  # 16 bytes a pixel
    "progressive 4:4:4 JPEG": lambda: encoded(gradients((SIDE, SIDE)), "JPEG", progressive=True, subsampling=0),  # 6
    "progressive CMYK JPEG": lambda: encoded(gradients((SIDE, SIDE)).convert("CMYK"), "JPEG", progressive=True),  # 8
}


@pytest.mark.parametrize("case", list(OVER_THE_DECODE_LIMIT))
def test_an_upload_whose_decode_would_hold_too_much_is_refused_before_decoding(created, case) -> None:
    data = OVER_THE_DECODE_LIMIT[case]()
    created.clear()
    with pytest.raises(uploads.UploadError, match="UPLOAD_DECODE_MAX_MIB") as refused:
        uploads.prepare_upload(data, SETTINGS.max_upload_pixels, max_decode_bytes=DECODE_LIMIT)
    assert refused.value.status == 413 and created == []


def with_orientation(image: Image.Image, orientation: int) -> Image.Exif:
    exif = image.getexif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


def alpha_face(size: tuple[int, int]) -> Image.Image:
    return Image.merge("RGBA", (*gradients(size).split(), Image.radial_gradient("L").resize(size)))


SIZE = (1500, 1100)  # reduced by 2 before the Lanczos resize
ALLOWED_DIFFERENCE = 0.5  # mean absolute difference per channel (0-255) from the full-size decode
REDUCED_AS_FULL: dict[str, Callable[[], bytes]] = {
    "RGB PNG": lambda: encoded(gradients(SIZE), "PNG"),
    "RGBA PNG": lambda: encoded(alpha_face(SIZE), "PNG"),
    "LA PNG": lambda: encoded(alpha_face(SIZE).convert("LA"), "PNG"),
    "palette PNG with a transparent colour": lambda: encoded(
        gradients(SIZE).convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0),
    "16-bit grey PNG": lambda: encoded(
        Image.linear_gradient("L").resize(SIZE).convert("I").point(lambda v: v * 257).convert("I;16"), "PNG"),
    "CMYK JPEG": lambda: encoded(gradients(SIZE).convert("CMYK"), "JPEG", quality=95),
    "JPEG turned by EXIF (6)": lambda: encoded(gradients(SIZE), "JPEG", quality=95,
                                               exif=with_orientation(gradients(SIZE), 6)),
    "PNG mirrored by EXIF (2)": lambda: encoded(gradients(SIZE), "PNG", exif=with_orientation(gradients(SIZE), 2)),
    "lossless WebP": lambda: encoded(alpha_face(SIZE), "WEBP", lossless=True),
}


def decoded_at_full_size(data: bytes) -> Image.Image:
    """The documented conversion done the simple way: the whole image decoded, oriented, converted, resized."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    rgb = uploads.to_rgb(image)
    return rgb.resize(uploads.bounded_size(rgb.size, spec.EDIT_MAX_SIDE), Image.LANCZOS)


@pytest.mark.parametrize("case", list(REDUCED_AS_FULL))
def test_the_reduced_decode_gives_what_the_full_size_decode_gives(case) -> None:
    data = REDUCED_AS_FULL[case]()
    reduced = Image.open(io.BytesIO(uploads.prepare_upload(data, SETTINGS.max_upload_pixels)))
    expected = decoded_at_full_size(data)
    assert reduced.mode == "RGB" and reduced.size == expected.size
    difference = ImageStat.Stat(ImageChops.difference(reduced, expected)).mean
    assert max(difference) <= ALLOWED_DIFFERENCE, difference


def test_only_the_accepted_formats_decoders_run(monkeypatch) -> None:
    opened = []
    for name in ("GIF", "BMP", "TIFF"):
        factory, accept = Image.OPEN[name]
        monkeypatch.setitem(Image.OPEN, name, (lambda *args, _name=name: opened.append(_name), accept))
    for fmt in ("GIF", "BMP", "TIFF"):
        with pytest.raises(uploads.UploadError, match=f"{fmt} images are not accepted") as refused:
            uploads.prepare_upload(encoded(Image.new("RGB", (8, 8)), fmt), SETTINGS.max_upload_pixels)
        assert refused.value.status == 415
    assert opened == []


def face_png() -> bytes:
    return encoded(gradients((64, 48)), "PNG")


@pytest.fixture
def held_decodes(monkeypatch) -> Iterator[tuple[threading.Event, list[int]]]:
    """prepare_upload held until the returned event is set; the list records how many decodes ran at once."""
    release, running, at_once = threading.Event(), [], []
    real = uploads.prepare_upload

    def held(*args, **kwargs):
        running.append(1)
        at_once.append(len(running))
        try:
            assert release.wait(timeout=60)
            return real(*args, **kwargs)
        finally:
            running.pop()

    monkeypatch.setattr(uploads, "prepare_upload", held)
    yield release, at_once
    release.set()


def post_edit_in_background(client) -> tuple[threading.Thread, list]:
    answers: list = []
    thread = threading.Thread(target=lambda: answers.append(
        client.post("/edit", data={"label": "smiling"}, files={"image": ("face.png", face_png())})))
    thread.start()
    return thread, answers


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


def test_an_upload_over_the_decode_concurrency_is_503_with_retry_after(make_client, held_decodes, conn) -> None:
    release, at_once = held_decodes
    client = make_client(upload_decode_concurrency=1, upload_decode_wait_s=0, retry_after_s=7)
    first, first_answer = post_edit_in_background(client)
    wait_until(lambda: at_once == [1])  # the first upload holds the only slot
    refused = client.post("/edit", data={"label": "smiling"}, files={"image": ("face.png", face_png())})
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "7"
    assert refused.json()["detail"].startswith("image: ") and "UPLOAD_DECODE_CONCURRENCY" in refused.json()["detail"]
    assert 'facegen_api_jobs_rejected_total{reason="decode_busy"} 1.0' in client.get("/metrics").text
    release.set()
    first.join()
    assert first_answer[0].status_code == 202
    assert at_once == [1] and conn.llen(f"rq:queue:{spec.DEFAULT_QUEUE}") == 1


def test_an_upload_waits_for_a_decode_slot_and_decodes_run_one_at_a_time(make_client, held_decodes, conn,
                                                                          caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=uploads.log.name)
    release, at_once = held_decodes
    client = make_client(upload_decode_concurrency=1, upload_decode_wait_s=30)
    first, first_answer = post_edit_in_background(client)
    wait_until(lambda: at_once == [1])
    second, second_answer = post_edit_in_background(client)
    wait_until(lambda: any("waits for a decode slot" in record.message for record in caplog.records))
    assert at_once == [1]  # the second waits outside the decoder
    release.set()
    first.join()
    second.join()
    assert [first_answer[0].status_code, second_answer[0].status_code] == [202, 202]
    assert at_once == [1, 1] and conn.llen(f"rq:queue:{spec.DEFAULT_QUEUE}") == 2
