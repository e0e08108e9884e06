"""A real ``python -m worker`` process against a real Redis: batching, determinism, progress, cancel, failures,
metrics and refusing bad checkpoints."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from PIL import Image
from rq import Queue, Retry
from rq.job import Job, JobStatus

from facegen.contract.job_serializer import JOB_SERIALIZER, refusal
from facegen.contract.spec import (
    DEFAULT_QUEUE,
    JOB_FUNCTION,
    META_ARTIFACTS,
    META_BATCH,
    META_BATCH_RUN,
    META_ERROR,
    META_PROGRESS,
    JobSpec,
    artifact_key,
    cancel_key,
)
from facegen.model.imaging import GRID_PADDING
from scripts.processes import free_port, stop_process
from tests.conftest import ROOT, redis_url_for_db
from tests.planted import plant_pickle
from worker.engine import Engine, ImageRequest

REDIS_URL = redis_url_for_db(12)
TILE = 64


@pytest.fixture()
def connection() -> redis.Redis:
    conn = redis.Redis.from_url(REDIS_URL)
    conn.flushdb()
    yield conn
    conn.flushdb()


def worker_env(checkpoints: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": REDIS_URL, "CHECKPOINT_DIR": str(checkpoints), "METRICS_PORT": "0",
            "THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def run_burst(checkpoints: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", "--burst"], cwd=ROOT, env=worker_env(checkpoints, **extra),
                          capture_output=True, text=True, timeout=300)


def enqueue(queue: Queue, **fields) -> Job:
    spec = JobSpec(**{"attributes": {"Smiling": True}, "seed": 1, "count": 1, "steps": 4, **fields})
    return queue.enqueue(JOB_FUNCTION, spec.model_dump(mode="json"), retry=Retry(max=2), result_ttl=600)


def tiles(png: bytes, count: int) -> list[bytes]:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    cols = image.width // (TILE + GRID_PADDING)
    out = []
    for k in range(count):
        r, c = divmod(k, cols)
        x, y = GRID_PADDING + c * (TILE + GRID_PADDING), GRID_PADDING + r * (TILE + GRID_PADDING)
        out.append(image.crop((x, y, x + TILE, y + TILE)).tobytes())
    return out


def test_compatible_jobs_share_one_batch_and_keep_their_own_results(tiny_checkpoints, connection) -> None:
    queue = Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    a = enqueue(queue, seed=5, count=3)
    b = enqueue(queue, seed=6, count=2, attributes={"Smiling": False})
    other = enqueue(queue, seed=5, count=1, steps=5)  # other steps: cannot join
    c = enqueue(queue, seed=5, count=1, animation=True, animation_frames=4)
    result = run_burst(tiny_checkpoints)
    assert result.returncode == 0, result.stderr[-2000:]
    for job in (a, b, c, other):
        job.refresh()
        assert job.get_status() == JobStatus.FINISHED, job.meta
    assert a.meta[META_BATCH] == b.meta[META_BATCH] == c.meta[META_BATCH] == {"jobs": 3, "images": 6}
    assert other.meta[META_BATCH] == {"jobs": 1, "images": 1}
    assert a.meta[META_PROGRESS] == {"step": 4, "total": 4}
    grids = {job.id: connection.get(artifact_key(job.id, "grid")) for job in (a, b, c)}
    assert Image.open(io.BytesIO(grids[a.id])).size == (2 * (TILE + GRID_PADDING) + GRID_PADDING,) * 2
    assert Image.open(io.BytesIO(grids[b.id])).size == (2 * (TILE + GRID_PADDING) + GRID_PADDING, TILE + 2 * GRID_PADDING)
    a_tiles, c_tiles = tiles(grids[a.id], 3), tiles(grids[c.id], 1)
    assert c_tiles[0] == a_tiles[0]  # same (seed, index): same pixels, batched differently
    assert len(set(a_tiles)) == 3
    assert connection.get(artifact_key(a.id, "animation")) is None
    gif = Image.open(io.BytesIO(connection.get(artifact_key(c.id, "animation"))))
    assert gif.format == "GIF" and gif.n_frames == 4
    assert set(c.meta[META_ARTIFACTS]) == {"grid", "animation"}
    assert 0 < connection.ttl(artifact_key(a.id, "grid")) <= 600


def batch_invariant_here(checkpoints: Path) -> bool:
    """Whether this CPU computes an image with the same bits alone and in a batch of five, in the worker's default
    precision: true where oneDNN runs bf16 natively (AVX-512 bf16, AMX); a CPU without native bf16 has been seen to
    differ by a rounding (README "Same seed, same pixels")."""
    engine = Engine(checkpoints, "latest", device="cpu", precision="auto", max_batch=8)
    alone = ImageRequest("alone", {"Smiling": True}, seed=11, count=2)
    shared = ImageRequest("shared", {"Smiling": True}, seed=12, count=3)
    first, _ = engine.run([alone], "ddpm", 6, 5.0)
    second, _ = engine.run([alone, shared], "ddpm", 6, 5.0)
    return torch.equal(first["alone"].images, second["alone"].images)


def test_same_request_gives_the_same_png_whatever_batch_it_shares(tiny_checkpoints, connection) -> None:
    queue = Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    first = enqueue(queue, seed=11, count=2, sampler="ddpm", steps=6)
    assert run_burst(tiny_checkpoints, MAX_BATCH="1").returncode == 0
    second = enqueue(queue, seed=11, count=2, sampler="ddpm", steps=6)
    enqueue(queue, seed=12, count=3, sampler="ddpm", steps=6)
    assert run_burst(tiny_checkpoints, MAX_BATCH="8").returncode == 0
    first_png, second_png = (connection.get(artifact_key(job.id, "grid")) for job in (first, second))
    pixels = [torch.from_numpy(np.array(Image.open(io.BytesIO(png)).convert("RGB"))).float()
              for png in (first_png, second_png)]
    if batch_invariant_here(tiny_checkpoints):
        assert torch.equal(pixels[0], pixels[1])  # the PNGs differ only in their provenance (the job id)
    else:  # the same picture to within rounding
        assert (pixels[0] - pixels[1]).abs().mean() < 1.0


def test_bad_jobs_fail_with_a_reason_and_the_worker_goes_on(tiny_checkpoints, connection) -> None:
    queue = Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    malformed = queue.enqueue(JOB_FUNCTION, {"attributes": {"Smiling": True}, "count": 0, "seed": 1}, retry=Retry(max=2))
    unknown = enqueue(queue, attributes={"Wearing_Hat": True})
    wrong_model = enqueue(queue, model="no-such-version")
    fine = enqueue(queue)
    assert run_burst(tiny_checkpoints).returncode == 0
    for job, reason in ((malformed, "invalid job spec: count"), (unknown, "unknown attribute"),
                        (wrong_model, "not served by this worker")):
        job.refresh()
        assert job.get_status() == JobStatus.FAILED
        assert reason in job.meta[META_ERROR] and "Traceback" not in job.meta[META_ERROR]
        assert job.retries_left == 0  # permanent errors are not retried
    fine.refresh()
    assert fine.get_status() == JobStatus.FINISHED


def test_jobs_not_stored_as_json_or_naming_another_function_are_refused_never_run(tiny_checkpoints, connection,
                                                                                  tmp_path) -> None:
    """A pickle planted in a job's data or meta is never unpickled (its marker file never appears), nor is a JSON job
    naming another function called: each fails with its reason, and none joins the batch of a job they wait behind."""
    queue = Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    pickled_data, fine, pickled_meta = enqueue(queue, seed=2), enqueue(queue), enqueue(queue, seed=3)
    plant_pickle(connection, pickled_data.id, "data", tmp_path / "data-unpickled")
    plant_pickle(connection, pickled_meta.id, "meta", tmp_path / "meta-unpickled")
    spec = JobSpec(attributes={"Smiling": True}, seed=4, count=1, steps=4)
    other_function = queue.enqueue("builtins.print", spec.model_dump(mode="json"), retry=Retry(max=2))
    result = run_burst(tiny_checkpoints)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
    for job, reason in ((pickled_data, refusal("data")), (pickled_meta, refusal("meta")),
                        (other_function, f"malformed job: its function is not {JOB_FUNCTION}: refused")):
        job.refresh()
        assert job.get_status() == JobStatus.FAILED
        assert job.meta[META_ERROR] == reason and job.retries_left == 0
    assert f"{pickled_data.id}: {refusal('data')}" in result.stderr
    fine.refresh()
    assert fine.get_status() == JobStatus.FINISHED and fine.meta[META_BATCH] == {"jobs": 1, "images": 1}


def test_running_job_is_canceled_between_steps_and_metrics_are_served(tiny_checkpoints, connection) -> None:
    port = free_port()
    queue = Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    long_job = enqueue(queue, sampler="ddpm", steps=1000, count=2)
    process = subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT,
                               env=worker_env(tiny_checkpoints, METRICS_PORT=str(port)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (long_job.refresh() or (long_job.meta.get(META_PROGRESS) or {}).get("step", 0) < 5):
            assert time.monotonic() < deadline and process.poll() is None, "job never made progress"
            time.sleep(0.2)
        connection.set(cancel_key(long_job.id), 1, ex=600)
        while long_job.get_status(refresh=True) != JobStatus.CANCELED:
            assert time.monotonic() < deadline, long_job.get_status()
            time.sleep(0.2)
        assert long_job.meta[META_PROGRESS]["step"] < 1000
        assert connection.get(artifact_key(long_job.id, "grid")) is None
        after = enqueue(queue, seed=3)
        while after.get_status(refresh=True) != JobStatus.FINISHED:
            assert time.monotonic() < deadline, after.get_status()
            time.sleep(0.2)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'facegen_worker_jobs_total{outcome="canceled"} 1.0' in metrics
        assert 'facegen_worker_images_total{label="smiling"} 1.0' in metrics
        assert "facegen_worker_phase_seconds_bucket" in metrics and "facegen_worker_model_info" in metrics
    finally:
        stop_process(process, grace_s=30)


def test_batch_window_lets_jobs_arriving_after_the_first_join_its_batch(tiny_checkpoints, connection) -> None:
    queue = Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    first = enqueue(queue, seed=1)
    process = subprocess.Popen([sys.executable, "-m", "worker", "--burst"], cwd=ROOT,
                               env=worker_env(tiny_checkpoints, BATCH_WINDOW_MS="3000"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while queue.count:  # the worker took the first job and is waiting out its window
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        late = [enqueue(queue, seed=2), enqueue(queue, seed=3)]
        assert process.wait(timeout=120) == 0
    finally:
        stop_process(process)
    for job in (first, *late):
        job.refresh()
        assert job.get_status() == JobStatus.FINISHED
        assert job.meta[META_BATCH] == {"jobs": 3, "images": 3}


def test_missing_or_tampered_checkpoint_stops_the_worker_at_start(tiny_checkpoints, tmp_path, connection) -> None:
    missing = run_burst(tmp_path / "nothing-here")
    assert missing.returncode == 2 and "no diffusion checkpoints" in missing.stderr
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoints, broken)
    weights = next((broken / "vae").glob("*/model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    tampered = run_burst(broken)
    assert tampered.returncode == 2 and "does not match the manifest" in tampered.stderr


def test_started_at_is_when_sampling_began_not_when_the_job_was_stored(tiny_checkpoints, connection) -> None:
    queue = Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    jobs = [enqueue(queue, sampler="ddpm", steps=60, seed=seed) for seed in (1, 2)]
    process = subprocess.Popen([sys.executable, "-m", "worker", "--burst"], cwd=ROOT,
                               env=worker_env(tiny_checkpoints), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while (jobs[1].refresh() or (jobs[1].meta.get(META_PROGRESS) or {}).get("step", 0) < 1):
            assert time.monotonic() < deadline and process.poll() is None, "job never made progress"
            time.sleep(0.05)
        sampling_seen = datetime.now(UTC)  # the batch is sampling now, so its sampling ends after this
        assert process.wait(timeout=300) == 0
    finally:
        stop_process(process)
    for job in jobs:
        job.refresh()
        assert job.get_status() == JobStatus.FINISHED
        assert job.started_at.replace(tzinfo=UTC) < sampling_seen < job.ended_at.replace(tzinfo=UTC)
        assert job.started_at.replace(tzinfo=UTC) == datetime.fromisoformat(job.meta[META_BATCH_RUN]["started_at"])


def test_a_batch_past_its_job_timeout_fails_with_timeout_and_the_next_job_runs(tiny_checkpoints, connection) -> None:
    queue = Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    spec = JobSpec(attributes={"Smiling": True}, seed=1, count=2, sampler="ddpm", steps=1000)
    slow = queue.enqueue(JOB_FUNCTION, spec.model_dump(mode="json"), retry=Retry(max=2), job_timeout=2)
    fine = enqueue(queue, seed=2)
    result = run_burst(tiny_checkpoints)
    assert result.returncode == 0, result.stderr[-2000:]
    slow.refresh()
    assert slow.get_status() == JobStatus.FAILED
    assert slow.meta[META_ERROR].startswith("timeout:") and "Traceback" not in slow.meta[META_ERROR]
    assert slow.retries_left == 0  # a retry would run as long
    assert slow.meta[META_PROGRESS]["step"] < 1000
    assert connection.get(artifact_key(slow.id, "grid")) is None
    fine.refresh()
    assert fine.get_status() == JobStatus.FINISHED
