"""POST /edit through a real uvicorn server: each hostile upload gets its 4xx naming the `image` field and the
problem, each odd-but-valid one its documented conversion to an 8-bit RGB PNG bounded for the worker."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image
from rq.job import Job

from facegen.contract import spec
from facegen.contract.job_serializer import JOB_SERIALIZER
from service.config import UPLOAD_FORM_OVERHEAD_BYTES
from tests.service.conftest import LiveServer

MAX_UPLOAD_BYTES = 300_000
MAX_UPLOAD_PIXELS = 2_000_000
UPLOAD_DECODE_MAX_MIB = 16  # a WebP of 1 M pixels (16 bytes a pixel) and no more


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[LiveServer]:
    live = LiveServer(redis_url, env={"MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
                                      "MAX_UPLOAD_PIXELS": str(MAX_UPLOAD_PIXELS),
                                      "UPLOAD_DECODE_MAX_MIB": str(UPLOAD_DECODE_MAX_MIB),
                                      "REDIS_MIN_REPLICAS_ACK": "0"})
    yield live
    live.stop()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), (80 * k, 0, 0)) for k in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zero_pixel_png() -> bytes:
    """A PNG whose header declares 0x0 pixels (Pillow cannot write one)."""
    header = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b""))
            + png_chunk(b"IEND", b""))


def post_edit(server: LiveServer, data: bytes, filename: str = "face.png", **fields) -> httpx.Response:
    form = {"label": "smiling", **{k: str(v) for k, v in fields.items()}}
    return httpx.post(f"{server.url}/edit", data=form, files={"image": (filename, data)}, timeout=30)


HOSTILE = {
    "not an image": (b"name,smile\nalice,yes\n" * 20, 415, "not an image"),
    "truncated": (encoded(Image.effect_noise((256, 256), 60).convert("RGB"), "PNG")[:3000], 422, "truncated"),
    "decompression bomb": (encoded(Image.new("1", (20_000, 20_000)), "PNG"), 413, "decompression bomb"),
    "over MAX_UPLOAD_PIXELS": (encoded(Image.new("RGB", (2000, 1001)), "PNG"), 413, "MAX_UPLOAD_PIXELS"),
    "WebP over UPLOAD_DECODE_MAX_MIB": (encoded(Image.new("RGB", (1025, 1024)), "WEBP"), 413, "UPLOAD_DECODE_MAX_MIB"),
    "0x0": (zero_pixel_png(), 422, "0 pixels"),
    "animated GIF": (animated("GIF"), 415, "GIF"),
    "animated WebP": (animated("WEBP"), 422, "animated"),
    "animated PNG": (animated("PNG"), 422, "animated"),
    "empty": (b"", 422, "empty"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_upload_is_refused_naming_the_field_and_the_problem(server, conn, case) -> None:
    data, status, words = HOSTILE[case]
    answer = post_edit(server, data)
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert detail.startswith("image: ") and words in detail
    assert conn.llen(f"rq:queue:{spec.DEFAULT_QUEUE}") == 0


def test_file_over_max_upload_bytes_is_413_and_a_larger_body_is_cut_by_the_body_limit(server, conn) -> None:
    noise = encoded(Image.effect_noise((400, 400), 90).convert("RGB"), "PNG")[:MAX_UPLOAD_BYTES + 1000]
    assert 1000 < UPLOAD_FORM_OVERHEAD_BYTES
    answer = post_edit(server, noise)
    assert answer.status_code == 413 and "MAX_UPLOAD_BYTES" in answer.json()["detail"]
    huge = post_edit(server, noise * 2)
    assert huge.status_code == 413 and "request body too large" in huge.json()["detail"]
    # the larger limit is /edit's alone: /generate keeps MAX_BODY_BYTES
    padded = httpx.post(f"{server.url}/generate", json={"label": "smiling", "model": "x" * 20_000}, timeout=10)
    assert padded.status_code == 413


def queued_png(conn, job_id: str) -> Image.Image:
    job = Job.fetch(job_id, connection=conn, serializer=JOB_SERIALIZER)
    edit = spec.parse_job_spec(job.args[0])
    assert isinstance(edit, spec.EditSpec) and job.description.startswith("edit ")
    image = Image.open(io.BytesIO(edit.image))
    assert image.format == "PNG" and image.mode == "RGB"
    return image


CONVERTED = {  # upload -> (expected size at the worker, expected RGB of pixel (0, 0))
    "CMYK JPEG": (encoded(Image.new("CMYK", (80, 96), (0, 255, 255, 0)), "JPEG", quality=100), (80, 96), (255, 0, 0)),
    "16-bit grey PNG": (encoded(Image.new("I;16", (50, 40), 40_000), "PNG"), (50, 40), (156, 156, 156)),
    "transparent RGBA": (encoded(Image.new("RGBA", (50, 40), (255, 0, 0, 0)), "PNG"), (50, 40), (255, 255, 255)),
    "half-transparent RGBA": (encoded(Image.new("RGBA", (50, 40), (0, 0, 0, 128)), "PNG"), (50, 40), (127, 127, 127)),
    "grey L WebP": (encoded(Image.new("L", (60, 60), 100), "WEBP", lossless=True), (60, 60), (100, 100, 100)),
    "palette PNG": (encoded(Image.new("RGB", (30, 30), (0, 0, 255)).convert("P"), "PNG"), (30, 30), (0, 0, 255)),
    "large RGB PNG": (encoded(Image.new("RGB", (1024, 512), (10, 200, 30)), "PNG"),
                      (spec.EDIT_MAX_SIDE, spec.EDIT_MAX_SIDE // 2), (10, 200, 30)),
}


@pytest.mark.parametrize("case", list(CONVERTED))
def test_odd_uploads_are_converted_to_a_bounded_rgb_png(server, conn, case) -> None:
    data, size, pixel = CONVERTED[case]
    answer = post_edit(server, data, strength=0.4, seed=9)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["status"] == "queued" and body["seed"] == 9
    image = queued_png(conn, body["job_id"])
    assert image.size == size
    assert all(abs(a - b) <= 2 for a, b in zip(image.getpixel((0, 0)), pixel, strict=True)), image.getpixel((0, 0))
    shown = httpx.get(f"{server.url}{body['links']['self']}", timeout=10).json()
    assert shown["parameters"]["kind"] == "edit" and shown["parameters"]["strength"] == 0.4
    assert "image" not in shown["parameters"]


def test_form_fields_are_validated_by_name(server, conn) -> None:
    face = encoded(Image.new("RGB", (64, 64)), "PNG")
    for fields, field in (({"strength": "1.5"}, "strength"), ({"label": "happy"}, "label"),
                          ({"attributes": "{not json"}, "attributes"), ({"steps": "0"}, "steps")):
        answer = httpx.post(f"{server.url}/edit", data={"label": "smiling", **fields} if "label" not in fields
                            else fields, files={"image": ("f.png", face)}, timeout=10)
        assert answer.status_code == 422, answer.text
        assert field in str(answer.json()["detail"])
    missing = httpx.post(f"{server.url}/edit", data={"label": "smiling"}, files={"other": ("f.png", face)}, timeout=10)
    assert missing.status_code == 422 and "image" in str(missing.json()["detail"])
    both = httpx.post(f"{server.url}/edit", data={"label": "smiling", "attributes": '{"Smiling": true}'},
                      files={"image": ("f.png", face)}, timeout=10)
    assert both.status_code == 422 and "label" in str(both.json()["detail"])


def test_idempotency_key_replays_the_same_edit_and_refuses_another_image(server, conn) -> None:
    face, other = (encoded(Image.new("RGB", (64, 64), colour), "PNG") for colour in ((1, 2, 3), (3, 2, 1)))
    headers = {"Idempotency-Key": "edit-1"}
    first = httpx.post(f"{server.url}/edit", data={"label": "smiling"}, files={"image": ("f.png", face)},
                       headers=headers, timeout=10)
    again = httpx.post(f"{server.url}/edit", data={"label": "smiling"}, files={"image": ("f.png", face)},
                       headers=headers, timeout=10)
    assert first.status_code == again.status_code == 202
    assert again.json()["job_id"] == first.json()["job_id"] and again.headers["Idempotent-Replayed"] == "true"
    changed = httpx.post(f"{server.url}/edit", data={"label": "smiling"}, files={"image": ("f.png", other)},
                         headers=headers, timeout=10)
    assert changed.status_code == 422
