"""The API's image conversion keeps the provenance a worker PNG carries (PNG text chunk -> EXIF UserComment), and
the reader finds it in every format; the client turns it into the request that recomputes the image. Torch-free,
like the API."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from facegen.contract.spec import PROVENANCE_KEY
from service.client import ClientError, reproduce_request
from service.images import ImageFormat, convert, read_parameters

RECORD = {"model": "v1", "model_sha256": "ab" * 32, "vae": "v0", "sampler": "dpmpp", "steps": 20,
          "guidance_scale": 5.0, "seed": 7, "index": 3, "attributes": {"Smiling": True}, "job_id": "j"}


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """A PNG with ``tEXt`` chunks, as the worker writes them (the live test checks the worker's own files)."""
    info = PngInfo()
    for keyword, value in (text or {}).items():
        info.add_text(keyword, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def worker_png(record: dict | None) -> bytes:
    """A 64x64 gradient PNG carrying ``record`` (none when ``None``)."""
    image = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    return png_bytes(image, {PROVENANCE_KEY: json.dumps(record)} if record is not None else None)


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("target", list(ImageFormat))
def test_every_format_carries_the_record_at_the_same_size(target: ImageFormat) -> None:
    image = opened(convert(worker_png(RECORD), target))
    assert image.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[target.value]
    assert image.size == (64, 64) and read_parameters(image) == RECORD
    if target != ImageFormat.jpeg:  # PNG as stored and lossless WebP keep the pixels
        assert image.convert("RGB").tobytes() == opened(worker_png(RECORD)).convert("RGB").tobytes()


@pytest.mark.parametrize("target", list(ImageFormat))
def test_an_image_without_a_record_has_none(target: ImageFormat) -> None:
    assert read_parameters(opened(convert(worker_png(None), target))) is None


def test_a_chunk_that_is_not_a_json_object_is_no_record() -> None:
    not_json = png_bytes(Image.new("RGB", (4, 4)), {PROVENANCE_KEY: "steps: 20"})
    a_list = png_bytes(Image.new("RGB", (4, 4)), {PROVENANCE_KEY: "[1, 2]"})
    assert read_parameters(opened(not_json)) is None and read_parameters(opened(a_list)) is None


def test_the_record_becomes_the_request_that_recomputes_it() -> None:
    single = reproduce_request(RECORD)
    assert single == {"attributes": {"Smiling": True}, "seed": 7, "steps": 20, "sampler": "dpmpp",
                      "guidance_scale": 5.0, "model": "v1", "count": 1, "first_index": 3}
    assert reproduce_request({**RECORD, "index": [4, 5, 6]}) | {"count": 0} == single | {"count": 0, "first_index": 4}
    with pytest.raises(ClientError, match="consecutive"):
        reproduce_request({**RECORD, "index": [0, 2]})
    with pytest.raises(ClientError, match="lacks a usable field"):
        reproduce_request({k: v for k, v in RECORD.items() if k != "seed"})
