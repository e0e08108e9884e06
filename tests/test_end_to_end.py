"""The whole product: real Redis, ``python -m worker`` on a tiny checkpoint, ``python -m service`` under
uvicorn, the HTTP contract, and the CLI client; files checked by decoding them."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import httpx
import pytest
import redis
from PIL import Image

from facegen.model.imaging import GRID_PADDING
from tests.conftest import ROOT, redis_url_for_db
from tests.service.conftest import LiveServer

REDIS_URL = redis_url_for_db(13)


@pytest.fixture(scope="module")
def stack(tiny_checkpoints):
    redis.Redis.from_url(REDIS_URL).flushdb()
    env = {**os.environ, "REDIS_URL": REDIS_URL, "CHECKPOINT_DIR": str(tiny_checkpoints), "METRICS_PORT": "0",
           "THREADS": "1", "MAX_BATCH": "16"}
    worker = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    server = LiveServer(REDIS_URL)
    try:
        deadline = time.monotonic() + 120
        while httpx.get(f"{server.url}/readyz").status_code != 200:
            assert worker.poll() is None and time.monotonic() < deadline, "worker never became ready"
            time.sleep(0.3)
        yield server
    finally:
        server.stop()
        worker.terminate()
        worker.wait(timeout=30)
        redis.Redis.from_url(REDIS_URL).flushdb()


def wait_finished(url: str, job_id: str) -> dict:
    deadline = time.monotonic() + 180
    while True:
        job = httpx.get(f"{url}/jobs/{job_id}").json()
        if job["status"] in ("finished", "failed", "canceled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.3)


def test_generate_png_and_gif_over_http(stack) -> None:
    models = httpx.get(f"{stack.url}/models").json()
    body = {"label": "Not_Smiling", "count": 3, "seed": 77, "steps": 5, "animation": True, "animation_frames": 4}
    answer = httpx.post(f"{stack.url}/generate", json=body)
    assert answer.status_code == 202, answer.text
    created = answer.json()
    assert created["seed"] == 77 and set(created["links"]) == {"self", "result", "animation"}
    early = httpx.get(f"{stack.url}/jobs/{created['job_id']}/result")
    job = wait_finished(stack.url, created["job_id"])
    assert job["status"] == "finished", job
    assert early.status_code in (200, 409)
    grid = httpx.get(f"{stack.url}/jobs/{created['job_id']}/result")
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(grid.content))
    assert image.size == (2 * (64 + GRID_PADDING) + GRID_PADDING,) * 2
    gif = httpx.get(f"{stack.url}/jobs/{created['job_id']}/animation")
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    assert Image.open(io.BytesIO(gif.content)).n_frames == 4
    assert str(models).count("smiling") >= 1 and httpx.get(f"{stack.url}/jobs/nope/result").status_code == 404


def test_cli_client_writes_a_decodable_grid(stack, tmp_path) -> None:
    out = tmp_path / "grid.png"
    result = subprocess.run([sys.executable, "-m", "service.client", "generate", "--url", stack.url, "--label",
                             "smiling", "--count", "2", "--seed", "1", "--steps", "4", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).format == "PNG"
