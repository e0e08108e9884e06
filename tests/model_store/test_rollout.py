"""Rolling out a version by moving an alias, against a real SeaweedFS and real Redis: two ``python -m worker``
processes serving ``MODEL_VERSION=stable`` take 200 jobs while the alias moves from one published version to another,
and a few more once the switch window has passed.
No job fails; every image's provenance names the version its batch ran (the one in its job's meta, the same for the
whole batch); each worker switches once, between batches, within a poll of the move; and a job pinned to the old
version still runs on it afterwards."""

from __future__ import annotations

import shutil
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus

from facegen.contract.job_serializer import JOB_SERIALIZER
from facegen.contract.model_store import ModelStore, ModelStoreSettings
from facegen.contract.spec import (
    DEFAULT_QUEUE,
    JOB_FUNCTION,
    LATEST,
    META_BATCH_RUN,
    META_RESOLVED,
    WORKER_INDEX_KEY,
    JobSpec,
    WorkerServing,
    artifact_key,
    worker_registry_key,
)
from facegen.model.checkpoints import derive_checkpoint, served_versions
from tests.conftest import redis_url_for_db
from tests.reliability.conftest import WorkerProcess, wait_for
from tests.worker.test_model_pool import nudged, provenance

REDIS_URL = redis_url_for_db(2)
JOBS = 200
MOVE_AFTER = 40  # jobs finished before the alias moves
LATE_JOBS = 16  # enqueued once the switch window has passed, so a fast machine that drained the queue still shows it
POLL_S = 0.5  # MODEL_ALIAS_POLL_S of the workers
# A batch claimed this long after the move ran the new version: one poll, plus the time between a batch's look at
# the alias and its claim (reading its companions), with room for a busy machine.
SWITCHED_WITHIN = timedelta(seconds=POLL_S + 5)
ENDED = {status.value.encode() for status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED,
                                              JobStatus.STOPPED)}


@pytest.fixture
def conn() -> redis.Redis:
    connection = redis.Redis.from_url(REDIS_URL)
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


def enqueue(queue: Queue, seed: int, model: str = LATEST) -> Job:
    """A job as the API enqueues it (by the function's name, stored as JSON)."""
    spec = JobSpec(attributes={"Smiling": seed % 2 == 0}, seed=seed, count=1, steps=2, model=model)
    return queue.enqueue(JOB_FUNCTION, spec.model_dump(mode="json"), result_ttl=600)


def ended(jobs: list[Job], conn: redis.Redis) -> int:
    """How many of ``jobs`` have ended (one round trip)."""
    with conn.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.hget(job.key, "status")
        return sum(status in ENDED for status in pipe.execute())


def serving(conn: redis.Redis) -> list[WorkerServing]:
    names = sorted(name.decode() for name in conn.smembers(WORKER_INDEX_KEY))
    return [WorkerServing.model_validate_json(raw) for raw in conn.mget([worker_registry_key(n) for n in names]) if raw]


def runs_checked_against_the_move(jobs: list[Job], conn: redis.Redis, moved_at: datetime, old: str, new: str
                                  ) -> tuple[dict[str, set[str]], dict[str, list[tuple[datetime, str]]]]:
    """The versions each batch ran, and each worker's ``(claimed at, version)`` runs, of finished ``jobs``; checks
    that each PNG's provenance names its job's version, that jobs ended before the move ran ``old`` and that batches
    claimed after the switch window ran ``new``."""
    batches: dict[str, set[str]] = defaultdict(set)
    by_worker: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    for job in jobs:
        ran = job.meta[META_RESOLVED]["model"]
        assert provenance(conn.get(artifact_key(job.id, "grid")))["model"] == ran, job.id
        batches[job.meta[META_BATCH_RUN]["id"]].add(ran)
        claimed = datetime.fromisoformat(job.meta[META_BATCH_RUN]["started_at"])
        by_worker[job.worker_name].append((claimed, ran))
        if job.ended_at.replace(tzinfo=UTC) < moved_at:
            assert ran == old, job.id
        if claimed > moved_at + SWITCHED_WITHIN:
            assert ran == new, (job.id, claimed, moved_at)
    return batches, by_worker


@pytest.mark.timeout(600)
def test_moving_an_alias_under_load_switches_every_worker_between_batches_without_a_failed_job(
        tiny_checkpoints: Path, store_env: dict[str, str], conn: redis.Redis, tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_checkpoints, root)
    old, _ = served_versions(root, LATEST)
    new = derive_checkpoint(root, "diffusion", old, weights=nudged).name  # other weights, other images
    store = ModelStore(ModelStoreSettings())
    for version in (old, new):
        store.publish(root / "diffusion" / version, "tester@test")
    store.set_alias("stable", old, "tester@test")

    env = {**store_env, "ARTIFACT_STORE": "redis", "MODEL_VERSION": "stable", "MODEL_ALIAS_POLL_S": str(POLL_S),
           "MAX_BATCH": "8"}
    workers = [WorkerProcess(REDIS_URL, tmp_path / f"cache-{k}", **env) for k in range(2)]
    try:
        wait_for(lambda: len(serving(conn)) == 2, 120, "both workers to serve")
        queue = Queue(DEFAULT_QUEUE, connection=conn, serializer=JOB_SERIALIZER)
        jobs = [enqueue(queue, seed) for seed in range(JOBS)]
        wait_for(lambda: ended(jobs, conn) >= MOVE_AFTER, 300, f"{MOVE_AFTER} jobs to end")
        moved_at = datetime.now(UTC)
        store.set_alias("stable", new, "tester@test")
        wait_for(lambda: datetime.now(UTC) > moved_at + SWITCHED_WITHIN, 60, "the switch window to pass", poll=0.1)
        jobs += [enqueue(queue, seed) for seed in range(JOBS, JOBS + LATE_JOBS)]
        wait_for(lambda: ended(jobs, conn) == len(jobs), 300, "every job to end", poll=0.5)
        pinned = enqueue(queue, len(jobs), model=old)
        wait_for(lambda: ended([pinned], conn), 120, "the job pinned to the old version to end")
        wait_for(lambda: {(s.serves, tuple(sorted(s.loaded))) for s in serving(conn)} == {
            (new, tuple(sorted((old, new))))}, 30, "both workers to report serving the new version")
    finally:
        for worker in workers:
            worker.stop()
    logs = [worker.log_path.read_text() for worker in workers]

    for job in (*jobs, pinned):
        job.refresh()
    failed = [(job.id, job.get_status(), job.meta) for job in (*jobs, pinned) if job.get_status() != JobStatus.FINISHED]
    assert not failed, (failed[:3], [log[-2000:] for log in logs])

    batches, by_worker = runs_checked_against_the_move(jobs, conn, moved_at, old, new)
    assert all(len(versions) == 1 for versions in batches.values())  # a batch runs one version
    counts = {version: sum(job.meta[META_RESOLVED]["model"] == version for job in jobs) for version in (old, new)}
    assert counts[old] >= MOVE_AFTER and counts[new] > 0, counts
    assert sum(claimed > moved_at + SWITCHED_WITHIN for runs in by_worker.values() for claimed, _ in runs) >= LATE_JOBS
    assert len(by_worker) == 2
    for runs in by_worker.values():  # each worker switched once: every batch after its first on the new version too
        order = [ran for _, ran in sorted(runs)]
        assert order == sorted(order, key=lambda ran: ran == new), order
    for log in logs:
        assert log.count(f"alias stable moved to {new}") == 1

    assert pinned.meta[META_RESOLVED]["model"] == old
    assert provenance(conn.get(artifact_key(pinned.id, "grid")))["model"] == old
    print(f"[rollout] {len(jobs)} jobs on 2 workers, alias moved after {MOVE_AFTER}: {counts[old]} ran {old}, "
          f"{counts[new]} ran {new}, {len(batches)} batches, 0 failed")
