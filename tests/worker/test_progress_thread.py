"""The engine's progress callback never waits on Redis: progress and cancel I/O run on a helper thread."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from worker.batch import Batch, WorkerRuntime
from worker.errors import JobCanceled
from worker.metrics import WorkerMetrics
from worker.progress import ProgressReporter
from worker.settings import WorkerSettings


class BlockingRedis:
    """A client whose every round trip waits until ``release`` is set; it answers 'cancel requested' once
    ``cancel`` is set."""

    def __init__(self):
        self.release, self.cancel, self.calls = threading.Event(), threading.Event(), 0

    def pipeline(self, transaction=True):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def exists(self, key):
        pass

    def xadd(self, key, fields, **options):  # the job's event stream
        pass

    def expire(self, key, seconds):
        pass

    def execute(self):
        self.calls += 1
        assert self.release.wait(60), "never released"
        return [self.cancel.is_set()]


class FakeJob:
    def __init__(self):
        self.id, self.timeout_s, self.meta, self.saved = "job-1", None, {}, []

    def save_meta(self):
        self.saved.append(dict(self.meta))


def test_steps_go_on_while_redis_hangs_and_the_latest_step_is_written() -> None:
    redis_client = BlockingRedis()
    job = FakeJob()
    runtime = WorkerRuntime(engine=SimpleNamespace(), settings=WorkerSettings(progress_interval=0.01),
                            metrics=WorkerMetrics())
    batch = Batch(running=[job])
    with ProgressReporter(batch, runtime, redis_client, heartbeat=None) as progress:
        for step in range(1, 501):  # would deadlock here if a step waited on the blocked client
            progress(step, 500)
        redis_client.release.set()
    assert job.saved[-1]["progress"] == {"step": 500, "total": 500}
    assert len(job.saved) < 500  # steps posted while a write was in flight were skipped, not queued


def test_a_cancel_seen_by_the_helper_stops_the_chain_at_a_later_step() -> None:
    redis_client = BlockingRedis()
    redis_client.release.set()
    redis_client.cancel.set()
    job = FakeJob()
    runtime = WorkerRuntime(engine=SimpleNamespace(), settings=WorkerSettings(progress_interval=0.01),
                            metrics=WorkerMetrics())
    batch = Batch(running=[job])
    with pytest.raises(JobCanceled), ProgressReporter(batch, runtime, redis_client, heartbeat=None) as progress:
        for step in range(1, 10**7):
            progress(step, 10**7)
    assert batch.canceled == {"job-1"} and not job.saved
