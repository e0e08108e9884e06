"""The delivery process (``python -m service.webhooks --burst``) on a real Redis reads jobs as JSON only: a pickle
planted in a delivery's hash is never unpickled and a delivery naming another function is never called (both fail
at once with their reason, without retries); a delivery whose generation job was overwritten with a pickle reports
that job as failed with the reason, to a real HTTP receiver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from rq import Queue, Retry
from rq.job import Job, JobStatus

from facegen.contract import spec
from facegen.contract.job_serializer import JOB_SERIALIZER, refusal
from service.config import Settings
from service.webhooks.delivery import DELIVER_FUNCTION
from tests.conftest import ROOT, flushed_database, redis_url_for_db
from tests.planted import plant_pickle
from tests.webhooks.conftest import SECRET, Receiver

REDIS_URL = redis_url_for_db(5)
WEBHOOK_QUEUE = Settings.model_fields["webhook_queue"].default
RETRY = Retry(max=3, interval=[1])


@pytest.fixture()
def conn():
    yield from flushed_database(REDIS_URL)


def deliver_burst(**env: str) -> subprocess.CompletedProcess:
    """``python -m service.webhooks --burst``: delivers what is queued, then exits."""
    return subprocess.run([sys.executable, "-m", "service.webhooks", "--burst"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "REDIS_URL": REDIS_URL, "WEBHOOK_SECRET": SECRET,
                               "WEBHOOK_METRICS_PORT": "0", "PYTHONPATH": str(ROOT), **env})


def test_deliveries_not_stored_as_json_or_calling_another_function_fail_at_once_unrun(conn, tmp_path: Path):
    queue = Queue(WEBHOOK_QUEUE, connection=conn, serializer=JOB_SERIALIZER)
    pickled = queue.enqueue(DELIVER_FUNCTION, args=(str(uuid.uuid4()), "http://127.0.0.1:9/hooks", ["completed"]),
                            retry=RETRY)
    plant_pickle(conn, pickled.id, "data", tmp_path / "unpickled")
    other_function = queue.enqueue("os.mkdir", args=(str(tmp_path / "made-by-os-mkdir"),), retry=RETRY)
    result = deliver_burst()
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
    for job, reason in ((pickled, refusal("data")),
                        (other_function, f"not a webhook delivery: its function is not {DELIVER_FUNCTION}: refused")):
        job.refresh()
        assert job.get_status() == JobStatus.FAILED and job.retries_left == 0
        assert job.latest_result().exc_string == reason
    assert queue.scheduled_job_registry.count == 0  # no retry waits


def test_a_job_overwritten_with_a_pickle_is_reported_failed_with_the_reason(conn, tmp_path: Path):
    receiver = Receiver(fail_first=0)
    server, url = receiver.serve()
    try:
        job_spec = spec.JobSpec(attributes={"Smiling": True}, seed=1, count=1)
        job = Job.create(spec.JOB_FUNCTION, args=(job_spec.model_dump(mode="json"),), connection=conn,
                         serializer=JOB_SERIALIZER, id=str(uuid.uuid4()))
        job.save()
        plant_pickle(conn, job.id, "data", tmp_path / "unpickled")
        Queue(WEBHOOK_QUEUE, connection=conn, serializer=JOB_SERIALIZER).enqueue(
            DELIVER_FUNCTION, args=(job.id, url, ["failed"]), retry=RETRY)
        result = deliver_burst(WEBHOOK_ALLOW_PRIVATE="true", WEBHOOK_ALLOWED_PORTS=url.split(":")[2].split("/")[0])
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
    (payload,) = receiver.delivered[job.id]
    assert payload["type"] == "job.failed", json.dumps(payload)
    assert payload["data"]["status"] == "failed" and payload["data"]["error"] == refusal("data")
