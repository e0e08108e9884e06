"""Job lifecycle through the API, with a fake worker that plays the worker's side of the contract in Redis."""

from __future__ import annotations

import io
import threading
import uuid

import httpx
import pytest
from PIL import Image
from rq import Queue
from rq.job import Job

from facegen.contract import spec
from facegen.contract.job_serializer import JOB_SERIALIZER, refusal
from service import job_ops, keys
from tests.planted import plant_pickle
from tests.service.fakeworker import (
    FakeBehaviour,
    FakeWorker,
    model_info,
    publish_model,
    render_png,
    wait_until,
)


def submit(client, **body) -> dict:
    response = client.post("/generate", json={"label": "smiling", **body})
    assert response.status_code == 202, response.text
    return response.json()


def test_submit_queues_a_job_spec_by_dotted_name(client, conn):
    accepted = submit(client, count=3, seed=42, steps=7, sampler="ddim", animation=True, animation_frames=4)
    job_id = accepted["job_id"]
    assert uuid.UUID(job_id).version == 4
    assert accepted["status"] == "queued"
    assert accepted["seed"] == 42
    assert accepted["links"] == {
        "self": f"/jobs/{job_id}", "result": f"/jobs/{job_id}/result", "animation": f"/jobs/{job_id}/animation",
    }
    job = Job.fetch(job_id, connection=conn, serializer=JOB_SERIALIZER)
    assert job.func_name == spec.JOB_FUNCTION
    assert job.origin == spec.DEFAULT_QUEUE
    assert job.description == "generate smiling x3"
    sent = spec.JobSpec.model_validate(job.args[0])
    assert sent == spec.JobSpec(attributes={"Smiling": True}, count=3, seed=42, steps=7, sampler="ddim",
                                animation=True, animation_frames=4)
    assert sent.guidance_scale is None  # the worker resolves it from the model
    assert job.result_ttl == spec.DEFAULT_ARTIFACT_TTL_S
    assert job.retries_left == 2
    assert "submitted_at" in job.meta


def test_seed_is_drawn_when_absent_and_echoed(client, conn):
    seeds = {submit(client)["seed"] for _ in range(3)}
    assert len(seeds) == 3
    assert all(0 <= s < 2**53 for s in seeds)
    accepted = submit(client)
    stored = Job.fetch(accepted["job_id"], connection=conn, serializer=JOB_SERIALIZER).args[0]
    assert spec.JobSpec.model_validate(stored).seed == accepted["seed"]


def test_no_animation_link_unless_asked(client):
    accepted = submit(client)
    assert "animation" not in accepted["links"]
    assert client.get(accepted["links"]["self"]).json()["links"].keys() == {"self", "result"}
    assert client.get(f"/jobs/{accepted['job_id']}/animation").status_code == 404


def test_queued_job_status_and_position(client):
    first, second = submit(client), submit(client)
    body = client.get(f"/jobs/{second['job_id']}").json()
    assert body["status"] == "queued"
    assert body["queue_position"] == 1
    assert client.get(f"/jobs/{first['job_id']}").json()["queue_position"] == 0
    assert body["progress"] is None
    assert body["enqueued_at"] and body["submitted_at"] and body["started_at"] is None
    assert body["parameters"]["attributes"] == {"Smiling": True}
    response = client.get(f"/jobs/{second['job_id']}/result")
    assert response.status_code == 409
    assert response.json()["status"] == "queued"
    assert response.headers["Retry-After"] == "1"


def test_lifecycle_progress_then_png_and_gif(client, conn):
    accepted = submit(client, count=5, seed=3, animation=True, animation_frames=6)
    job_id = accepted["job_id"]
    behaviour = FakeBehaviour(pause_at=10)
    worker = FakeWorker(conn, behaviour=behaviour)
    thread = threading.Thread(target=worker.drain)
    thread.start()
    try:
        assert behaviour.paused.wait(30), "fake worker never reached the pause"
        running = client.get(f"/jobs/{job_id}").json()
        assert running["status"] == "started"
        assert running["progress"] == {"step": 10, "total": spec.DEFAULT_STEPS[spec.Sampler.dpmpp]}
        assert running["started_at"] is not None and running["queue_position"] is None
        for kind in ("result", "animation"):
            not_ready = client.get(f"/jobs/{job_id}/{kind}")
            assert not_ready.status_code == 409
            assert not_ready.json()["status"] == "started"
    finally:
        behaviour.resume.set()
        thread.join(30)
    done = client.get(f"/jobs/{job_id}").json()
    assert done["status"] == "finished"
    assert done["progress"] == {"step": 20, "total": 20}
    assert done["resolved"]["guidance_scale"] == 3.0 and done["resolved"]["steps"] == 20
    assert done["ended_at"] >= done["started_at"] >= done["enqueued_at"]
    assert done["error"] is None

    result = client.get(f"/jobs/{job_id}/result")
    assert result.status_code == 200
    assert result.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(result.content))
    assert image.format == "PNG" and image.size == (5 * 8, 8)
    assert result.content == render_png(spec.JobSpec(attributes={"Smiling": True}, count=5, seed=3))

    animation = client.get(f"/jobs/{job_id}/animation")
    assert animation.status_code == 200
    assert animation.headers["content-type"] == "image/gif"
    gif = Image.open(io.BytesIO(animation.content))
    assert gif.format == "GIF" and gif.n_frames == 6

    # Artifact expired (the job hash still there): 410, for each kind.
    conn.delete(spec.artifact_key(job_id, "grid"), spec.artifact_key(job_id, "animation"))
    assert client.get(f"/jobs/{job_id}/result").status_code == 410
    assert client.get(f"/jobs/{job_id}/animation").status_code == 410
    assert client.get(f"/jobs/{job_id}").json()["status"] == "finished"


def test_expired_job_is_410_not_404(client, conn, fake_worker):
    with_gif, without_gif = submit(client, animation=True), submit(client)
    fake_worker.drain()
    for accepted in (with_gif, without_gif):
        job_id = accepted["job_id"]
        conn.delete(Job.key_for(job_id), spec.artifact_key(job_id, "grid"), spec.artifact_key(job_id, "animation"))
        assert client.get(f"/jobs/{job_id}").status_code == 410
        assert client.get(f"/jobs/{job_id}/result").status_code == 410
    assert client.get(f"/jobs/{with_gif['job_id']}/animation").status_code == 410
    assert client.get(f"/jobs/{without_gif['job_id']}/animation").status_code == 404
    # once the tombstone is gone too, the id is unknown
    conn.delete(keys.tombstone_key(with_gif["job_id"]))
    assert client.get(f"/jobs/{with_gif['job_id']}").status_code == 404


@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "not-a-uuid", "x" * 300, "rq:job:1"])
def test_unknown_job_is_404(client, job_id):
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/result", f"/jobs/{job_id}/animation"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["detail"]
    assert client.delete(f"/jobs/{job_id}").status_code == 404


def test_foreign_rq_job_is_not_exposed(client, conn):
    other = Queue("other", connection=conn, serializer=JOB_SERIALIZER).enqueue("os.getcwd",
                                                                              job_id=str(uuid.uuid4()))
    assert client.get(f"/jobs/{other.id}").status_code == 404


def test_cancel_queued_job(client, conn, fake_worker):
    accepted = submit(client)
    job_id = accepted["job_id"]
    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"
    assert conn.llen(f"rq:queue:{spec.DEFAULT_QUEUE}") == 0
    assert fake_worker.drain() is False  # nothing left to run
    assert fake_worker.behaviour.runs == []
    body = client.get(f"/jobs/{job_id}").json()
    assert body["status"] == "canceled" and body["error"] == "canceled"
    result = client.get(f"/jobs/{job_id}/result")
    assert result.status_code == 409 and result.json()["status"] == "canceled"
    assert "Retry-After" not in result.headers
    again = client.delete(f"/jobs/{job_id}")
    assert again.status_code == 409 and again.json()["status"] == "canceled"


def test_cancel_running_job(client, conn):
    job_id = submit(client)["job_id"]
    behaviour = FakeBehaviour(pause_at=5)
    thread = threading.Thread(target=FakeWorker(conn, behaviour=behaviour).drain)
    thread.start()
    try:
        assert behaviour.paused.wait(30)
        response = client.delete(f"/jobs/{job_id}")
        assert response.status_code == 202
        assert response.json()["status"] == "started"
        assert response.json()["cancel_requested"] is True
        ttl = conn.ttl(spec.cancel_key(job_id))
        assert 0 < ttl <= 900 + 60
    finally:
        behaviour.resume.set()
        thread.join(30)
    body = client.get(f"/jobs/{job_id}").json()
    assert body["status"] == "canceled"
    assert body["error"] == "canceled by request"
    assert body["cancel_requested"] is False  # ended: nothing pending
    assert client.get(f"/jobs/{job_id}/result").status_code == 409
    assert client.delete(f"/jobs/{job_id}").status_code == 409


def test_cancel_finished_job_is_409(client, fake_worker):
    job_id = submit(client)["job_id"]
    fake_worker.drain()
    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 409
    assert response.json()["status"] == "finished"


def test_failed_job_shows_one_line_error_no_traceback(client, conn):
    job_id = submit(client)["job_id"]
    worker = FakeWorker(conn, behaviour=FakeBehaviour(fail_with="CUDA out of memory"))
    worker.drain()
    assert len(worker.behaviour.runs) == 3  # RQ retried it twice
    body = client.get(f"/jobs/{job_id}").json()
    assert body["status"] == "failed"
    assert body["error"] == "CUDA out of memory"
    result = client.get(f"/jobs/{job_id}/result")
    assert result.status_code == 409
    assert result.json() == {"detail": "job failed: no images", "status": "failed", "error": "CUDA out of memory"}
    assert "Traceback" not in client.get(f"/jobs/{job_id}").text


@pytest.mark.parametrize("field", ["data", "meta"])
def test_a_job_not_stored_as_json_reads_as_failed_and_is_never_unpickled(live_server, conn, tmp_path, field):
    """Over HTTP (``python -m service``): a pickle planted in a queued job's hash is never unpickled by the API (its
    marker file never appears); the job answers as failed with the reason the worker fails it with."""
    with httpx.Client(base_url=live_server.url, timeout=10) as http:
        accepted = http.post("/generate", json={"label": "smiling"})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        plant_pickle(conn, job_id, field, tmp_path / "unpickled")
        status, result, cancel = (http.get(f"/jobs/{job_id}"), http.get(f"/jobs/{job_id}/result"),
                                  http.delete(f"/jobs/{job_id}"))
    assert list(tmp_path.iterdir()) == []
    assert status.status_code == 200, status.text
    assert (status.json()["status"], status.json()["error"]) == ("failed", refusal(field))
    assert result.status_code == 409 and result.json()["error"] == refusal(field)
    assert cancel.status_code == 409 and cancel.json()["status"] == "failed"


def test_failed_job_without_reason_gets_generic_line(client, conn):
    job_id = submit(client)["job_id"]
    job = Job.fetch(job_id, connection=conn, serializer=JOB_SERIALIZER)
    job.meta.pop(spec.META_ERROR, None)
    job.save_meta()
    job.set_status("failed")
    conn.hset(job.key, "exc_info", "Traceback (most recent call last): secret internals")
    body = client.get(f"/jobs/{job_id}").json()
    assert body["error"] == job_ops.GENERIC_ERROR
    assert "secret" not in client.get(f"/jobs/{job_id}").text


def test_idempotency_key_returns_the_same_job(client, conn):
    headers = {"Idempotency-Key": "req-1"}
    first = client.post("/generate", json={"label": "smiling"}, headers=headers)
    second = client.post("/generate", json={"label": "smiling"}, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["job_id"] == second.json()["job_id"]
    assert first.json()["seed"] == second.json()["seed"]  # the drawn seed too
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert conn.llen(f"rq:queue:{spec.DEFAULT_QUEUE}") == 1
    other_key = client.post("/generate", json={"label": "smiling"}, headers={"Idempotency-Key": "req-2"})
    assert other_key.json()["job_id"] != first.json()["job_id"]
    conflict = client.post("/generate", json={"label": "not_smiling"}, headers=headers)
    assert conflict.status_code == 422
    assert conflict.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert "different request body" in conflict.json()["detail"][0]["msg"]
    assert conn.llen(f"rq:queue:{spec.DEFAULT_QUEUE}") == 2


def test_backpressure_429_with_retry_after(make_client, conn):
    client = make_client(max_queued=2, retry_after_s=7)
    submit(client)
    kept = client.post("/generate", json={"label": "smiling"}, headers={"Idempotency-Key": "k"})
    assert kept.status_code == 202
    refused = client.post("/generate", json={"label": "smiling"})
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "7"
    assert "queue full" in refused.json()["detail"]
    assert conn.llen(f"rq:queue:{spec.DEFAULT_QUEUE}") == 2
    # A retry of an accepted request still gets its job back; a refused key stays usable later.
    replay = client.post("/generate", json={"label": "smiling"}, headers={"Idempotency-Key": "k"})
    assert replay.status_code == 202 and replay.json()["job_id"] == kept.json()["job_id"]
    assert client.post("/generate", json={"label": "smiling"}, headers={"Idempotency-Key": "new"}).status_code == 429
    Queue(spec.DEFAULT_QUEUE, connection=conn, serializer=JOB_SERIALIZER).empty()
    assert client.post("/generate", json={"label": "smiling"}, headers={"Idempotency-Key": "new"}).status_code == 202


def test_settings_reach_the_rq_job(make_client, conn):
    client = make_client(queue_name="facegen-test", artifact_ttl=120, failure_ttl=300, job_timeout=45)
    job = Job.fetch(submit(client)["job_id"], connection=conn, serializer=JOB_SERIALIZER)
    assert job.origin == "facegen-test"
    assert (job.result_ttl, job.failure_ttl, job.timeout) == (120, 300, 45)


def test_labels_follow_the_published_model(client, conn):
    publish_model(conn, model_info(attributes=["Smiling", "Eyeglasses"]))
    job_id = submit(client, label="eyeglasses")["job_id"]
    assert Job.fetch(job_id, connection=conn, serializer=JOB_SERIALIZER).args[0]["attributes"] == {
        "Eyeglasses": True}
    response = client.post("/generate", json={"attributes": {"smiling": True, "EYEGLASSES": False}})
    assert response.status_code == 202
    stored = Job.fetch(response.json()["job_id"], connection=conn, serializer=JOB_SERIALIZER).args[0]
    assert stored["attributes"] == {"Smiling": True, "Eyeglasses": False}
    refused = client.post("/generate", json={"label": "wearing_hat"})
    assert refused.status_code == 422
    assert "eyeglasses" in refused.json()["detail"][0]["msg"]
    assert client.post("/generate", json={"label": "smiling", "model": "fake-v1"}).status_code == 202
    assert client.post("/generate", json={"label": "smiling", "model": "fake-v0"}).status_code == 422


def test_a_newly_published_model_is_usable_at_once_despite_the_cache(make_client, conn):
    client = make_client(model_cache_s=60)
    assert client.post("/generate", json={"label": "eyeglasses"}).status_code == 422  # cached: no models yet
    publish_model(conn, model_info(attributes=["Smiling", "Eyeglasses"]))
    assert client.post("/generate", json={"label": "eyeglasses"}).status_code == 202  # re-read on the miss
    conn.delete(spec.model_registry_key(model_info().version), spec.MODEL_INDEX_KEY)
    # Within MODEL_CACHE_S the cached view still answers (the worker's entry could as well have been alive) ...
    assert client.post("/generate", json={"label": "eyeglasses"}).status_code == 202
    # ... while with 0 every request reads the registry.
    assert make_client(model_cache_s=0).post("/generate", json={"label": "eyeglasses"}).status_code == 422


def test_only_admitted_jobs_get_a_tombstone(make_client, conn):
    client = make_client(max_queued=1, tombstone_ttl=3600)
    admitted = submit(client)["job_id"]
    assert conn.exists(keys.tombstone_key(admitted), f"rq:job:{admitted}") == 2
    assert 3590 < conn.ttl(keys.tombstone_key(admitted)) <= 3600
    assert client.post("/generate", json={"label": "smiling"}).status_code == 429
    assert len(conn.keys(keys.tombstone_key("*"))) == 1 and len(conn.keys("rq:job:*")) == 1


def test_wait_until_helper_fails_loudly():
    with pytest.raises(AssertionError, match="timed out waiting for nothing"):
        wait_until(lambda: False, timeout=0.05, what="nothing")


def test_job_with_unreadable_spec_still_answers(client, conn):
    job_id = submit(client, animation=True)["job_id"]
    job = Job.fetch(job_id, connection=conn, serializer=JOB_SERIALIZER)
    assert job.func_name == spec.JOB_FUNCTION  # (decodes the stored call before we replace its arguments)
    job.args = ({"attributes": {"Smiling": True}, "seed": 1, "from_a_future_api": True},)
    job.save()
    body = client.get(f"/jobs/{job_id}").json()
    assert body["status"] == "queued" and body["parameters"] is None
    assert "animation" in body["links"]  # from the tombstone
    assert client.get(f"/jobs/{job_id}/animation").status_code == 409
