"""Edit jobs end to end: a face uploaded to POST /edit on a real uvicorn server, edited by a real
``python -m worker`` process, fetched back over HTTP and decoded; strength 0 is the VAE round trip."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from PIL import Image
from rq.job import Job

from facegen.contract.job_serializer import JOB_SERIALIZER
from facegen.contract.spec import EDIT_MAX_SIDE
from facegen.model.imaging import GRID_PADDING, face_crop, to_float, to_uint8
from facegen.model.pipeline import LatentDiffusion
from tests.conftest import ROOT, redis_url_for_db
from tests.service.conftest import LiveServer
from training.data.synthetic import face

REDIS_URL = redis_url_for_db(13)
TILE = 64


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer(REDIS_URL, env={"REDIS_MIN_REPLICAS_ACK": "0"})
    yield live
    live.stop()


@pytest.fixture()
def connection() -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(REDIS_URL)
    conn.flushdb()
    yield conn
    conn.flushdb()


def run_worker(checkpoints: Path) -> None:
    env = {**os.environ, "REDIS_URL": REDIS_URL, "CHECKPOINT_DIR": str(checkpoints), "METRICS_PORT": "0",
           "THREADS": "1", "PRECISION": "fp32", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "worker", "--burst"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def face_upload(index: int) -> tuple[bytes, Image.Image]:
    """A synthetic 178x218 face as a JPEG file, and the RGB image Pillow decodes from it."""
    image, _, _ = face(11, index)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def submit(server: LiveServer, upload: bytes, **fields) -> dict:
    answer = httpx.post(f"{server.url}/edit", data={k: str(v) for k, v in fields.items()},
                        files={"image": ("face.jpg", upload, "image/jpeg")}, timeout=30)
    assert answer.status_code == 202, answer.text
    return answer.json()


def pair(png: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """The [input | edit] grid -> two ``uint8 [3, 64, 64]`` tiles."""
    grid = Image.open(io.BytesIO(png))
    assert grid.format == "PNG" and grid.size == (2 * TILE + 3 * GRID_PADDING, TILE + 2 * GRID_PADDING)
    tiles = [grid.crop((x, GRID_PADDING, x + TILE, GRID_PADDING + TILE)) for x in (GRID_PADDING, 2 * GRID_PADDING + TILE)]
    return tuple(as_tensor(tile) for tile in tiles)


def as_tensor(image: Image.Image) -> torch.Tensor:
    """An image -> ``uint8 [3, H, W]`` RGB."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean()
    return float(10 * torch.log10(255.0**2 / mse))


def test_edit_jobs_end_to_end_on_the_tiny_model(tiny_checkpoints, server, connection) -> None:
    upload, decoded = face_upload(0)
    assert max(decoded.size) <= EDIT_MAX_SIDE  # sent to the worker unscaled
    keep = submit(server, upload, label="smiling", strength=0, steps=10, animation="true")
    edit = submit(server, upload, label="smiling", strength=0.5, steps=10, animation="true")
    other = submit(server, upload, label="not_smiling", strength=0.5, steps=10)
    generate = httpx.post(f"{server.url}/generate", json={"label": "smiling", "count": 1, "steps": 10}, timeout=10)
    assert generate.status_code == 202
    run_worker(tiny_checkpoints)

    with httpx.Client(base_url=server.url, timeout=10) as http:
        status = {job["job_id"]: http.get(job["links"]["self"]).json() for job in (keep, edit, other)}
        assert all(s["status"] == "finished" for s in status.values()), status
        assert status[edit["job_id"]]["progress"] == {"step": 10, "total": 10}  # 5 inverted + 5 regenerated
        assert status[edit["job_id"]]["resolved"]["strength"] == 0.5
        kept_input, kept = pair(http.get(keep["links"]["result"]).content)
        edit_input, edited = pair(http.get(edit["links"]["result"]).content)
        gif = Image.open(io.BytesIO(http.get(edit["links"]["animation"]).content))
        assert "animation" not in other["links"] and http.get(f"{other['links']['self']}/animation").status_code == 404
    batches = [Job.fetch(job["job_id"], connection=connection, serializer=JOB_SERIALIZER).meta["batch"]
               for job in (edit, other)]
    assert batches == [{"jobs": 2, "images": 2}] * 2  # same strength and steps: one batch, without the generate job

    crop = torch.from_numpy(face_crop(decoded, LatentDiffusion.load(tiny_checkpoints).manifest.data))
    assert torch.equal(kept_input, crop) and torch.equal(edit_input, crop)  # the input, cropped like training
    model = LatentDiffusion.load(tiny_checkpoints, dtype=torch.float32)
    round_trip = to_uint8(model.decode(model.encode(to_float(crop[None]))))[0]
    assert torch.equal(kept, round_trip)  # strength 0: exactly the VAE round trip
    assert not torch.equal(edited, round_trip)

    assert gif.n_frames == 1 + 5  # the input, then each of the 5 regeneration steps (the last is the edit)
    tile = (GRID_PADDING, GRID_PADDING, GRID_PADDING + TILE, GRID_PADDING + TILE)  # each frame is a 1-image grid
    gif.seek(0)
    first = as_tensor(gif.convert("RGB").crop(tile))
    gif.seek(gif.n_frames - 1)
    last = as_tensor(gif.convert("RGB").crop(tile))
    # GIF palettes are lossy: the first frame is nearer the input than the edit, the last nearer the edit
    assert psnr_db(first, crop) > psnr_db(first, edited) and psnr_db(last, edited) > psnr_db(last, crop)
