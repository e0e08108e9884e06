"""The student sampler through a real ``python -m worker`` process on a real Redis: jobs finish with PNGs whose
provenance names the student, batch only with student jobs of the same steps, draw the same pixels at any batch,
animate every step, and fail with a reason where the student cannot serve them."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from PIL import Image
from rq import Queue
from rq.job import JobStatus

from facegen.contract.job_serializer import JOB_SERIALIZER
from facegen.contract.spec import (
    DEFAULT_QUEUE,
    META_BATCH,
    META_ERROR,
    META_RESOLVED,
    PROVENANCE_KEY,
    ModelInfo,
    artifact_key,
    image_kind,
    model_registry_key,
)
from facegen.model.checkpoints import LATEST, WEIGHTS_FILE, load_checkpoint, served_versions
from tests.conftest import flushed_database
from tests.worker.test_worker_process import REDIS_URL, batch_invariant_here, enqueue, run_burst, tiles


@pytest.fixture()
def connection() -> Iterator[redis.Redis]:
    """The worker process tests' database (their helpers run the worker on it), emptied before and after."""
    yield from flushed_database(REDIS_URL)


def provenance(png: bytes) -> dict:
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return json.loads(image.text[PROVENANCE_KEY])


def test_student_jobs_finish_named_by_the_student_and_batch_only_with_their_steps(tiny_student_checkpoints: Path,
                                                                                 connection: redis.Redis) -> None:
    teacher, student = served_versions(tiny_student_checkpoints, LATEST)
    queue = Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    grid = enqueue(queue, sampler="student", seed=5, count=2, steps=4)
    animated = enqueue(queue, sampler="student", seed=5, count=1, steps=None, animation=True)  # default: 4 steps
    other_steps = enqueue(queue, sampler="student", seed=5, count=1, steps=2)
    plain = enqueue(queue, seed=5, count=1, steps=4)
    off_range = enqueue(queue, sampler="student", guidance_scale=12.0)
    result = run_burst(tiny_student_checkpoints)
    assert result.returncode == 0, result.stderr[-2000:]
    for job in (grid, animated, other_steps, plain, off_range):
        job.refresh()
    for job in (grid, animated, other_steps, plain):
        assert job.get_status() == JobStatus.FINISHED, job.meta
    assert grid.meta[META_BATCH] == animated.meta[META_BATCH] == {"jobs": 2, "images": 3}
    assert other_steps.meta[META_BATCH] == plain.meta[META_BATCH] == {"jobs": 1, "images": 1}
    assert grid.meta[META_RESOLVED] == {"steps": 4, "guidance_scale": 3.0, "sampler": "student", "model": teacher,
                                        "student": student}
    assert animated.meta[META_RESOLVED]["steps"] == 4

    png = connection.get(artifact_key(grid.id, "grid"))
    record = provenance(png)
    assert (record["sampler"], record["steps"], record["model"], record["student"]) == ("student", 4, teacher, student)
    assert record["student_sha256"] == load_checkpoint(tiny_student_checkpoints, "diffusion", student).manifest.files[
        WEIGHTS_FILE] != record["model_sha256"]
    assert "student" not in provenance(connection.get(artifact_key(plain.id, "grid")))
    single = connection.get(artifact_key(grid.id, image_kind(1)))
    assert provenance(single)["index"] == 1 and Image.open(io.BytesIO(single)).size == (64, 64)
    grid_tiles = tiles(png, 2)
    assert tiles(connection.get(artifact_key(animated.id, "grid")), 1)[0] == grid_tiles[0]  # same (seed, index)
    assert tiles(connection.get(artifact_key(other_steps.id, "grid")), 1)[0] != grid_tiles[0]
    gif = Image.open(io.BytesIO(connection.get(artifact_key(animated.id, "animation"))))
    assert gif.format == "GIF" and gif.n_frames == 5  # the noise, then each of the 4 steps' predictions

    assert off_range.get_status() == JobStatus.FAILED and off_range.retries_left == 0
    assert off_range.meta[META_ERROR] == (f"the student {student} was distilled for guidance_scale 1 to 8 (or 0, "
                                          "unconditional), not 12")
    entry = ModelInfo.model_validate_json(connection.get(model_registry_key(teacher)))
    assert entry.is_latest and entry.student.version == student and entry.default_steps["student"] == 4


def test_a_student_image_has_the_same_pixels_alone_and_in_a_batch_of_four(tiny_student_checkpoints: Path,
                                                                          connection: redis.Redis) -> None:
    queue = Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    alone = enqueue(queue, sampler="student", seed=11, count=1, steps=4)
    assert run_burst(tiny_student_checkpoints, MAX_BATCH="1").returncode == 0
    shared = enqueue(queue, sampler="student", seed=11, count=1, steps=4)
    company = enqueue(queue, sampler="student", seed=12, count=3, steps=4)
    assert run_burst(tiny_student_checkpoints, MAX_BATCH="4").returncode == 0
    shared.refresh()
    assert shared.meta[META_BATCH] == {"jobs": 2, "images": 4} and company.get_status() == JobStatus.FINISHED
    pixels = [torch.from_numpy(np.array(Image.open(io.BytesIO(connection.get(artifact_key(job.id, "grid"))))
                                          .convert("RGB"))).float() for job in (alone, shared)]
    if batch_invariant_here(tiny_student_checkpoints):
        assert torch.equal(pixels[0], pixels[1])
    else:  # the same picture to within rounding (README "Same seed, same pixels")
        assert (pixels[0] - pixels[1]).abs().mean() < 1.0


def test_the_student_sampler_without_a_student_fails_with_a_reason(tiny_checkpoints: Path,
                                                                   connection: redis.Redis) -> None:
    queue = Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    refused, fine = enqueue(queue, sampler="student"), enqueue(queue)
    assert run_burst(tiny_checkpoints).returncode == 0
    refused.refresh()
    version, _ = served_versions(tiny_checkpoints, LATEST)
    assert refused.get_status() == JobStatus.FAILED and refused.retries_left == 0
    assert refused.meta[META_ERROR] == (f"model {version} has no distilled student on this worker: the student "
                                        "sampler is not served (GET /models: student)")
    assert fine.get_status(refresh=True) == JobStatus.FINISHED
    assert ModelInfo.model_validate_json(connection.get(model_registry_key(version))).student is None
