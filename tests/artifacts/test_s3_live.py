"""The S3 artifact store in the running product: ``python -m service`` under uvicorn and ``python -m worker`` with
``ARTIFACT_STORE=s3`` on a SeaweedFS, real HTTP, files checked by decoding them. The last two tests stop the store
and bring it back."""

from __future__ import annotations

import io
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from PIL import Image
from rq.job import Job

from facegen.contract.job_serializer import JOB_SERIALIZER
from facegen.contract.spec import artifact_key
from facegen.model.imaging import GRID_PADDING
from service.client import FacegenClient
from tests.conftest import redis_url_for_db
from tests.reliability.conftest import WorkerProcess, wait_ended, wait_for
from tests.service.conftest import LiveServer

REDIS_URL = redis_url_for_db(6)
# Store failures end quickly: two uploads a fifth of a second apart, and one retry of the job by RQ.
WORKER_ENV = {"ARTIFACT_PUT_ATTEMPTS": "2", "ARTIFACT_PUT_BACKOFF_S": "0.2", "ARTIFACT_STORE_TIMEOUT_S": "1",
              "MAX_BATCH": "8"}
API_ENV = {"JOB_RETRIES": "1", "ARTIFACT_STORE_TIMEOUT_S": "1"}
START_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def stack(s3_server, tiny_checkpoints):
    conn = redis.Redis.from_url(REDIS_URL)
    conn.flushdb()
    env = s3_server.env()
    # a generous start-up bound: on a machine shared with training jobs the API has been seen to take 90 s
    api = LiveServer(REDIS_URL, env={**env, **API_ENV}, start_timeout_s=START_TIMEOUT_S)
    redirecting = LiveServer(REDIS_URL, env={**env, **API_ENV, "ARTIFACT_REDIRECT": "true"},
                             start_timeout_s=START_TIMEOUT_S)
    worker = WorkerProcess(REDIS_URL, tiny_checkpoints, **env, **WORKER_ENV)
    try:
        wait_for(lambda: httpx.get(f"{api.url}/readyz").status_code == 200 or not worker.alive(), 180,
                 "the worker to publish its model")
        assert worker.alive(), worker.output()
        yield api, redirecting, conn
    finally:
        worker.stop()
        api.stop()
        redirecting.stop()
        conn.flushdb()
        conn.close()


def submit(url: str, **body) -> str:
    response = httpx.post(f"{url}/generate", json={"label": "smiling", "steps": 3, **body}, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def object_key(s3_server, job_id: str, name: str) -> str:
    return f"{s3_server.env()['S3_PREFIX']}{job_id}/{name}"


def test_results_come_from_the_bucket_or_a_presigned_redirect(stack, s3_server) -> None:
    api, redirecting, conn = stack
    job_id = submit(api.url, count=3, seed=5, animation=True, animation_frames=3)
    assert wait_ended(api.url, [job_id], timeout=180)[job_id]["status"] == "finished"

    grid = httpx.get(f"{api.url}/jobs/{job_id}/result", timeout=10)
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(grid.content)).size == (2 * (64 + GRID_PADDING) + GRID_PADDING,) * 2
    gif = httpx.get(f"{api.url}/jobs/{job_id}/animation", timeout=10)
    assert gif.status_code == 200 and Image.open(io.BytesIO(gif.content)).n_frames == 3
    # the bytes live in the bucket, not in Redis
    stored = s3_server.client().get_object(Bucket=s3_server.bucket, Key=object_key(s3_server, job_id, "grid"))
    assert stored["Body"].read() == grid.content and stored["ContentType"] == "image/png"
    assert not conn.exists(artifact_key(job_id, "grid"), artifact_key(job_id, "animation"))

    redirect = httpx.get(f"{redirecting.url}/jobs/{job_id}/result", timeout=10)
    assert redirect.status_code == 307 and redirect.headers["cache-control"] == "no-store"
    location = redirect.headers["location"]
    assert urlsplit(location).netloc == urlsplit(s3_server.endpoint_url).netloc and "X-Amz-Signature=" in location
    download = httpx.get(location, timeout=10)
    assert download.status_code == 200 and download.content == grid.content
    assert httpx.get(f"{redirecting.url}/jobs/{job_id}/animation", timeout=10).status_code == 307
    with FacegenClient(redirecting.url) as client:  # the CLI's client follows the redirect
        assert client.artifact(job_id, "animation") == gif.content
    # the job's state still decides first: an unknown job is 404, not a redirect
    assert httpx.get(f"{redirecting.url}/jobs/{'0' * 8}-0000-0000-0000-{'0' * 12}/result").status_code == 404


def test_expired_artifacts_are_410(stack, s3_server) -> None:
    api, _, conn = stack
    by_lifecycle, by_ttl = submit(api.url, count=1, seed=1), submit(api.url, count=1, seed=2)
    states = wait_ended(api.url, [by_lifecycle, by_ttl], timeout=180)
    assert {state["status"] for state in states.values()} == {"finished"}
    # The bucket's lifecycle rule deleted the object: 410, while the job itself is still there.
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key=object_key(s3_server, by_lifecycle, "grid"))
    assert httpx.get(f"{api.url}/jobs/{by_lifecycle}/result", timeout=10).status_code == 410
    assert httpx.get(f"{api.url}/jobs/{by_lifecycle}", timeout=10).json()["status"] == "finished"
    # The job reached its ARTIFACT_TTL in Redis (here: a millisecond from now): 410 without asking the bucket,
    # though the object is still there until the lifecycle rule runs.
    conn.pexpire(Job.key_for(by_ttl), 1)
    wait_for(lambda: not conn.exists(Job.key_for(by_ttl)), 10, "the job to expire")
    assert httpx.get(f"{api.url}/jobs/{by_ttl}/result", timeout=10).status_code == 410
    assert s3_server.client().head_object(Bucket=s3_server.bucket, Key=object_key(s3_server, by_ttl, "grid"))


def test_an_unreachable_store_fails_the_job_and_503s_the_artifact(stack, s3_server) -> None:
    api, _, conn = stack
    finished = submit(api.url, count=1, seed=3)
    assert wait_ended(api.url, [finished], timeout=180)[finished]["status"] == "finished"
    s3_server.kill()

    answer = httpx.get(f"{api.url}/jobs/{finished}/result", timeout=10)
    assert answer.status_code == 503, answer.text
    assert answer.json()["detail"] == "the artifact store is unreachable; retry later" and "Retry-After" in answer.headers
    assert httpx.get(f"{api.url}/jobs/{finished}", timeout=10).json()["status"] == "finished"  # other routes work
    ready = httpx.get(f"{api.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["artifact_store"] is False

    failing = submit(api.url, count=1, seed=4)
    state = wait_ended(api.url, [failing], timeout=180)[failing]
    assert state["status"] == "failed", state
    assert state["error"].startswith("ArtifactStoreUnavailable: artifact store unreachable"), state["error"]
    assert "after 2 attempts" in state["error"]
    # nothing lost in Redis: the job, its spec and its error are there
    job = Job.fetch(failing, connection=conn, serializer=JOB_SERIALIZER)
    assert job.args[0]["seed"] == 4 and job.retries_left == 0
    assert httpx.get(f"{api.url}/jobs/{failing}/result", timeout=10).status_code == 409


def test_when_the_store_is_back_jobs_finish_again_without_restarts(stack, s3_server) -> None:
    """After the outage above: the same API and worker processes (their S3 clients reconnect) store and serve."""
    api, _, _ = stack
    s3_server.start()
    wait_for(lambda: httpx.get(f"{api.url}/readyz", timeout=10).json().get("artifact_store") is True, 60,
             "/readyz to see the store again")
    recovered = submit(api.url, count=1, seed=5)
    assert wait_ended(api.url, [recovered], timeout=180)[recovered]["status"] == "finished"
    answer = httpx.get(f"{api.url}/jobs/{recovered}/result", timeout=10)
    assert answer.status_code == 200
    assert Image.open(io.BytesIO(answer.content)).size[0] > 0
