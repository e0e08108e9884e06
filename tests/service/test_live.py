"""The deployed shape: `python -m service` under uvicorn, real HTTP, the CLI client, a fake worker thread."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid

import httpx
from PIL import Image

from tests.service.conftest import REPO
from tests.service.fakeworker import FAKE_VERSION, wait_until


def cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.client", *args, "--url", server.url],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("FACEGEN_")},
    )


def test_smoke_over_http(live_server, background_worker):
    with httpx.Client(base_url=live_server.url, timeout=10) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").status_code == 200
        accepted = http.post("/generate", json={"label": "not_smiling", "count": 2, "seed": 11, "animation": True})
        assert accepted.status_code == 202
        assert accepted.headers["location"] == accepted.json()["links"]["self"]
        links = accepted.json()["links"]
        job = wait_until(lambda: (b := http.get(links["self"]).json())["status"] == "finished" and b,
                         what="the job to finish")
        assert job["parameters"]["attributes"] == {"Smiling": False}
        png = http.get(links["result"])
        assert Image.open(io.BytesIO(png.content)).format == "PNG"
        gif = http.get(links["animation"])
        assert Image.open(io.BytesIO(gif.content)).format == "GIF"
        schema = http.get("/openapi.json").json()
        assert {"/generate", "/jobs/{job_id}", "/jobs/{job_id}/result", "/models", "/readyz"} <= schema["paths"].keys()
        assert "429" in schema["paths"]["/generate"]["post"]["responses"]
        assert schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        page = http.get("/")
        assert page.status_code == 200 and "facegen" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert http.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert http.get("/static/config.py").status_code == 404


def test_cli_status_of_unknown_job(live_server, conn):
    result = cli(live_server, "status", str(uuid.uuid4()))
    assert result.returncode == 1
    assert "error: job not found (HTTP 404)" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unreachable_server():
    result = subprocess.run([sys.executable, "-m", "service.client", "status", "x", "--url", "http://127.0.0.1:9"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in result.stderr


def test_cli_validation_error_names_the_field(live_server, conn, tmp_path):
    result = cli(live_server, "generate", "--label", "happy", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 1
    assert "error: label: unknown label 'happy'; valid labels: not_smiling, smiling (HTTP 422)" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_generate_status_fetch(live_server, background_worker, tmp_path):
    grid, gif = tmp_path / "grid.png", tmp_path / "anim.gif"
    result = cli(live_server, "generate", "--label", "smiling", "--count", "16", "--seed", "1",
                 "--out", str(grid), "--gif", str(gif))
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert "seed 1" in result.stderr
    image = Image.open(grid)
    assert image.format == "PNG" and image.size == (8 * 8, 2 * 8)  # 16 fake 8-px tiles, 8 per row
    assert Image.open(gif).format == "GIF"

    status = cli(live_server, "status", job_id)
    assert status.returncode == 0
    assert json.loads(status.stdout)["status"] == "finished"

    again = tmp_path / "again.png"
    fetched = cli(live_server, "fetch", job_id, "--out", str(again))
    assert fetched.returncode == 0, fetched.stderr
    assert again.read_bytes() == grid.read_bytes()

    canceled = cli(live_server, "cancel", job_id)
    assert canceled.returncode == 1 and "job already finished (HTTP 409)" in canceled.stderr
    models = cli(live_server, "models")
    assert json.loads(models.stdout)["latest"] == FAKE_VERSION
