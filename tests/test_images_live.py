"""Single images, provenance, reproduce and transitions as deployed: ``python -m service`` under uvicorn with two API
keys, ``python -m worker`` on a tiny checkpoint, a real Redis; every file checked by decoding it."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis
import torch
from PIL import Image

from facegen.contract import spec
from facegen.model.device import cpu_has_native_bf16, pick_dtype
from facegen.model.imaging import GRID_PADDING, grid_shape
from service.images import read_parameters
from tests.conftest import ROOT, redis_url_for_db
from tests.reliability.conftest import WorkerProcess, wait_for
from tests.service.conftest import LiveServer

REDIS_URL = redis_url_for_db(7)
KEYS = {"a": "key-a-images-test", "b": "key-b-images-test"}
WORKER_DTYPE = str(pick_dtype(torch.device("cpu"), "auto")).removeprefix("torch.")  # the stack's PRECISION=auto
SIDE = 64  # the tiny checkpoint's resolution


def auth(name: str = "a") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def stack(tiny_checkpoints):
    conn = redis.Redis.from_url(REDIS_URL)
    conn.flushdb()
    server = LiveServer(REDIS_URL, env={"API_KEYS": ",".join(KEYS.values())})
    # the worker's default precision, the one whose batch invariance README "Same seed, same pixels" describes
    worker = WorkerProcess(REDIS_URL, tiny_checkpoints, MAX_BATCH="16", PRECISION="auto")
    try:
        wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 200 or not worker.alive(), 180,
                 "the worker to publish its model")
        assert worker.alive(), worker.output()
        yield server
    finally:
        server.stop()
        worker.stop()
        conn.flushdb()
        conn.close()


def submit(stack: LiveServer, body: dict, key: str = "a") -> str:
    answer = httpx.post(f"{stack.url}/generate", json=body, headers=auth(key))
    assert answer.status_code == 202, answer.text
    return answer.json()["job_id"]


def finished(stack: LiveServer, body: dict, key: str = "a") -> str:
    job_id = submit(stack, body, key)
    job = wait_for(lambda: (j := httpx.get(f"{stack.url}/jobs/{job_id}", headers=auth(key)).json())["status"]
                   in ("finished", "failed", "canceled") and j, 180, "the job to end")
    assert job["status"] == "finished", job
    return job_id


def get(stack: LiveServer, path: str, key: str = "a", **params: str) -> httpx.Response:
    return httpx.get(f"{stack.url}{path}", headers=auth(key), params=params)


def decode(response: httpx.Response) -> Image.Image:
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).float()


def tile(grid: Image.Image, index: int, count: int) -> Image.Image:
    _, cols = grid_shape(count)
    row, col = divmod(index, cols)
    left, top = GRID_PADDING + col * (SIDE + GRID_PADDING), GRID_PADDING + row * (SIDE + GRID_PADDING)
    return grid.crop((left, top, left + SIDE, top + SIDE))


def assert_same_picture(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical where the engine is batch-invariant (README "Same seed, same pixels"), else within rounding."""
    assert torch.equal(a, b) or (not cpu_has_native_bf16() and (a - b).abs().mean() < 1.0)


@pytest.fixture(scope="module")
def grid_job(stack) -> str:
    return finished(stack, {"label": "smiling", "count": 3, "seed": 5, "steps": 4})


def test_each_image_alone_in_each_format_at_the_model_resolution(stack, grid_job) -> None:
    grid = decode(get(stack, f"/jobs/{grid_job}/result"))
    tiles = [pixels(tile(grid, index, 3)) for index in range(3)]
    for index in range(3):
        png = get(stack, f"/jobs/{grid_job}/images/{index}")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        single = decode(png)
        assert single.format == "PNG" and single.size == (SIDE, SIDE)
        assert torch.equal(pixels(single), tiles[index])
        webp = get(stack, f"/jobs/{grid_job}/images/{index}", format="webp")
        assert webp.status_code == 200 and webp.headers["content-type"] == "image/webp"
        assert decode(webp).format == "WEBP" and torch.equal(pixels(decode(webp)), pixels(single))  # lossless
        jpeg = get(stack, f"/jobs/{grid_job}/images/{index}", format="jpeg")
        assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
        assert decode(jpeg).format == "JPEG" and decode(jpeg).size == (SIDE, SIDE)
        lossy = pixels(decode(jpeg))  # not the same pixels, but the same picture: nearer its image than another's
        assert (lossy - tiles[index]).abs().mean() < (lossy - tiles[(index + 1) % 3]).abs().mean()
    assert not torch.equal(tiles[0], tiles[1])


def test_bad_index_or_format_is_refused_naming_it(stack, grid_job) -> None:
    beyond = get(stack, f"/jobs/{grid_job}/images/3")
    assert beyond.status_code == 404 and beyond.json()["detail"] == "no image 3: the job has 3 images (indices 0-2)"
    negative = get(stack, f"/jobs/{grid_job}/images/-1")
    assert negative.status_code == 422 and negative.json()["detail"][0]["loc"] == ["path", "index"]
    gif = get(stack, f"/jobs/{grid_job}/images/0", format="gif")
    assert gif.status_code == 422 and gif.json()["detail"][0]["loc"] == ["query", "format"]


def test_another_key_cannot_see_the_images(stack, grid_job) -> None:
    assert get(stack, f"/jobs/{grid_job}/images/0", key="b").status_code == 404
    assert get(stack, f"/jobs/{grid_job}/images/0", key="b", format="webp").json()["detail"] == "job not found"
    assert httpx.get(f"{stack.url}/jobs/{grid_job}/images/0").status_code == 401


def test_an_expired_image_is_410(stack) -> None:
    job_id = finished(stack, {"label": "not_smiling", "count": 1, "seed": 8, "steps": 2})
    redis.Redis.from_url(REDIS_URL).delete(spec.artifact_key(job_id, spec.image_kind(0)))  # its TTL ran out
    gone = get(stack, f"/jobs/{job_id}/images/0")
    assert gone.status_code == 410 and gone.json()["detail"] == "image expired"


def test_no_image_before_the_job_finishes_nor_after_a_cancel(stack) -> None:
    job_id = submit(stack, {"label": "smiling", "count": 16, "seed": 3, "steps": 400})
    early = get(stack, f"/jobs/{job_id}/images/0")  # 16 images x 400 steps cannot be done yet
    assert early.status_code == 409 and early.headers["retry-after"] and early.json()["detail"] == "not ready yet"
    assert httpx.delete(f"{stack.url}/jobs/{job_id}", headers=auth()).status_code in (200, 202)
    wait_for(lambda: get(stack, f"/jobs/{job_id}").json()["status"] == "canceled", 120, "the cancel")
    canceled = get(stack, f"/jobs/{job_id}/images/0")
    assert canceled.status_code == 409 and canceled.json() | {"error": None} == {
        "detail": "job canceled: no image", "status": "canceled", "error": None}


def test_every_png_carries_its_parameters(stack, grid_job) -> None:
    model = get(stack, "/models").json()["models"][0]
    job = get(stack, f"/jobs/{grid_job}").json()
    grid = read_parameters(decode(get(stack, f"/jobs/{grid_job}/result")))
    assert grid is not None and grid["index"] == [0, 1, 2]
    for index in range(3):
        png = decode(get(stack, f"/jobs/{grid_job}/images/{index}"))
        record = read_parameters(png)
        assert record == {**grid, "index": index}
        assert record["model"] == model["version"] and record["vae"] == model["vae_version"]
        assert len(record["model_sha256"]) == 64 and len(record["vae_sha256"]) == 64
        assert (record["sampler"], record["steps"], record["seed"]) == ("dpmpp", 4, 5)
        assert record["guidance_scale"] == job["resolved"]["guidance_scale"]
        assert record["attributes"] == {"Smiling": True} and record["job_id"] == grid_job
        assert record["dtype"] == WORKER_DTYPE and record["software"].startswith("facegen ")
        for fmt in ("webp", "jpeg"):  # converted images carry it in their EXIF UserComment
            assert read_parameters(decode(get(stack, f"/jobs/{grid_job}/images/{index}", format=fmt))) == record


def reproduce(stack: LiveServer, path: Path) -> Image.Image:
    """``python -m service.client reproduce path`` (as another key); the image it wrote. It must report identical
    pixels where the engine is batch-invariant (README "Same seed, same pixels"), else at least the same picture
    to within rounding."""
    result = subprocess.run([sys.executable, "-m", "service.client", "reproduce", str(path), "--url", stack.url,
                             "--api-key", KEYS["b"]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    written = path.with_name(f"{path.stem}-reproduced.png")
    assert written.exists(), result.stderr
    again = Image.open(written)
    difference = (pixels(again) - pixels(Image.open(path))).abs()
    if result.returncode == 0:
        assert "identical pixels" in result.stdout and not difference.any()
    else:
        assert "pixels differ" in result.stderr and not cpu_has_native_bf16() and difference.mean() < 1.0, result
    return again


def test_reproduce_gives_identical_pixels_for_a_single_image_and_a_grid(stack, grid_job, tmp_path) -> None:
    single = tmp_path / "image-2.png"
    single.write_bytes(get(stack, f"/jobs/{grid_job}/images/2").content)
    again = reproduce(stack, single)
    assert read_parameters(again)["index"] == 2 and read_parameters(again)["job_id"] != grid_job
    grid = tmp_path / "grid.png"
    grid.write_bytes(get(stack, f"/jobs/{grid_job}/result").content)
    assert read_parameters(reproduce(stack, grid))["index"] == [0, 1, 2]
    webp = tmp_path / "image-0.webp"
    webp.write_bytes(get(stack, f"/jobs/{grid_job}/images/0", format="webp").content)  # EXIF-carried, lossless
    assert read_parameters(reproduce(stack, webp))["index"] == 0


def test_reproduce_refuses_a_file_without_parameters(stack, tmp_path) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    result = subprocess.run([sys.executable, "-m", "service.client", "reproduce", str(plain), "--url", stack.url],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "carries no facegen parameters" in result.stderr


def gif_frames(response: httpx.Response) -> list[torch.Tensor]:
    gif = Image.open(io.BytesIO(response.content))
    frames = []
    for number in range(gif.n_frames):
        gif.seek(number)
        frames.append(pixels(gif))
    return frames


def test_a_transition_goes_from_the_opposite_label_to_the_image(stack) -> None:
    body = {"label": "smiling", "count": 2, "seed": 9, "steps": 4}
    job_id = finished(stack, {**body, "transition": True, "transition_frames": 4})
    assert get(stack, f"/jobs/{job_id}").json()["links"]["animation"].endswith(f"/jobs/{job_id}/animation")
    animation = get(stack, f"/jobs/{job_id}/animation")
    assert animation.status_code == 200 and animation.headers["content-type"] == "image/gif"
    frames = gif_frames(animation)
    target = pixels(decode(get(stack, f"/jobs/{job_id}/result")))
    plain = pixels(decode(get(stack, f"/jobs/{finished(stack, body)}/result")))
    assert_same_picture(target, plain)  # the last frame is the image
    source = pixels(decode(get(stack, f"/jobs/{finished(stack, {**body, 'label': 'not_smiling'})}/result")))

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().mean())

    assert len(frames) == 4 and distance(source, target) > 0
    assert distance(frames[0], source) < distance(frames[0], target)  # GIF frames are palette-quantized
    assert distance(frames[-1], target) < distance(frames[-1], source)


@pytest.mark.parametrize(("extra", "field", "message"), [
    ({"animation": True}, "transition", "transition and animation are exclusive"),
    ({"count": 8, "transition_frames": 16}, "transition_frames", "count x transition_frames must be at most 64"),
])
def test_an_inconsistent_transition_is_422_naming_the_field(stack, extra: dict, field: str, message: str) -> None:
    answer = httpx.post(f"{stack.url}/generate", json={"label": "smiling", "transition": True, **extra},
                        headers=auth())
    assert answer.status_code == 422
    detail = answer.json()["detail"][0]
    assert detail["loc"] == ["body", field] and message in detail["msg"]


def test_first_index_is_image_index_of_the_grid(stack, grid_job) -> None:
    alone = finished(stack, {"label": "smiling", "count": 1, "seed": 5, "steps": 4, "first_index": 1})
    assert_same_picture(pixels(decode(get(stack, f"/jobs/{alone}/images/0"))),
                        pixels(decode(get(stack, f"/jobs/{grid_job}/images/1"))))
