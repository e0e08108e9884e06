"""Tenancy through the API with the fake worker: each key sees only its own jobs (an admin sees all), per-key
quotas answer 429 naming the limit, and keys take turns in the queue. The same promises against uvicorn and the
real worker: tests/tenancy/."""

from __future__ import annotations

import hashlib
import math
import re
import time

import pytest
from fastapi.routing import iter_route_contexts
from pydantic import ValidationError
from rq.job import Job

from facegen.contract import cost, spec
from facegen.contract.job_serializer import JOB_SERIALIZER
from service.app import create_app
from service.config import Settings
from service.tenancy import KeyLabels
from tests.service.fakeworker import FakeWorker, publish_model

KEYS = {"a": "key-a-0123456789", "b": "key-b-0123456789", "admin": "key-admin-0123456789"}


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def job_routes() -> list[tuple[str, str]]:
    """(method, template) of every route that names a job, read from the app itself."""
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    return [(method, route.path) for route in iter_route_contexts(app.routes) if "{job_id}" in route.path
            for method in sorted(route.methods or ())]


JOB_ROUTES = job_routes()


@pytest.fixture
def keyed(make_client):
    return make_client(api_keys=f"{KEYS['a']},{KEYS['b']}", admin_api_keys=KEYS["admin"])


def submit(client, who: str, **body):
    return client.post("/generate", json={"label": "smiling", **body}, headers=auth(who))


def units(**body) -> int:
    """The work units of POST /generate with ``body``."""
    return cost.job_units(spec.JobSpec(attributes={"Smiling": True}, seed=0, **body))


def test_job_routes_are_all_checked():
    assert {p for _, p in JOB_ROUTES} == {"/jobs/{job_id}", "/jobs/{job_id}/result", "/jobs/{job_id}/animation",
                                          "/jobs/{job_id}/images/{index}", "/jobs/{job_id}/events"}
    assert ("DELETE", "/jobs/{job_id}") in JOB_ROUTES


def test_another_keys_job_is_404_on_every_route_while_owner_and_admin_see_it(keyed, conn):
    publish_model(conn)
    job_id = submit(keyed, "a", animation=True, animation_frames=2).json()["job_id"]
    FakeWorker(conn).drain()
    never = "00000000-0000-4000-8000-000000000000"
    for method, template in JOB_ROUTES:
        if method == "DELETE":
            continue
        path = template.format(job_id=job_id, index=0)
        other = keyed.request(method, path, headers=auth("b"))
        assert other.status_code == 404, (path, other.text)
        assert other.json() == keyed.request(method, template.format(job_id=never, index=0), headers=auth("b")).json()
        assert keyed.request(method, path, headers=auth("a")).status_code == 200, path
        assert keyed.request(method, path, headers=auth("admin")).status_code == 200, path
    assert keyed.delete(f"/jobs/{job_id}", headers=auth("b")).status_code == 404
    assert keyed.delete(f"/jobs/{job_id}", headers=auth("a")).status_code == 409  # owner: it has ended
    assert conn.hget(Job.key_for(job_id), spec.OWNER_FIELD).decode() == key_id(KEYS["a"])


def test_other_key_cannot_cancel_a_queued_job_but_an_admin_can(keyed, conn):
    mine, theirs = submit(keyed, "a").json()["job_id"], submit(keyed, "a").json()["job_id"]
    assert keyed.delete(f"/jobs/{mine}", headers=auth("b")).status_code == 404
    assert keyed.get(f"/jobs/{mine}", headers=auth("a")).json()["status"] == "queued"
    assert keyed.delete(f"/jobs/{theirs}", headers=auth("admin")).json()["status"] == "canceled"
    assert keyed.delete(f"/jobs/{mine}", headers=auth("a")).json()["status"] == "canceled"
    assert conn.llen(spec.key_queue_key(spec.DEFAULT_QUEUE, key_id(KEYS["a"]))) == 0
    assert conn.llen(f"rq:queue:{spec.DEFAULT_QUEUE}") == 0


def test_an_expired_job_is_410_to_its_owner_and_404_to_others(keyed, conn):
    job_id = submit(keyed, "a").json()["job_id"]
    # as if its TTL ran out: the tombstone stays
    Job.fetch(job_id, connection=conn, serializer=JOB_SERIALIZER).delete()
    assert keyed.get(f"/jobs/{job_id}", headers=auth("a")).status_code == 410
    assert keyed.get(f"/jobs/{job_id}", headers=auth("admin")).status_code == 410
    assert keyed.get(f"/jobs/{job_id}", headers=auth("b")).status_code == 404
    assert keyed.get(f"/jobs/{job_id}/result", headers=auth("b")).status_code == 404


def test_an_open_api_shares_every_job(client, conn):
    accepted = submit(client, "a").json()  # the header is ignored: no keys are configured
    assert client.get(f"/jobs/{accepted['job_id']}").status_code == 200
    assert conn.hget(Job.key_for(accepted["job_id"]), spec.OWNER_FIELD) is None
    assert conn.llen(f"rq:queue:{spec.DEFAULT_QUEUE}") == 1  # one tenant: the RQ queue itself


def test_queued_jobs_quota_refuses_one_key_while_another_is_accepted(make_client, conn):
    client = make_client(api_keys=f"{KEYS['a']},{KEYS['b']}", quota_queued_jobs=3, retry_after_s=9)
    assert [submit(client, "a").status_code for _ in range(3)] == [202] * 3
    refused = submit(client, "a")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "9"
    assert refused.json()["limit"] == "queued_jobs" and refused.json()["allowed"] == 3
    assert "queued_jobs" in refused.json()["detail"]
    assert submit(client, "b").status_code == 202
    FakeWorker(conn).drain()  # the key's jobs are taken: room again
    assert submit(client, "a").status_code == 202


def test_queued_units_quota_counts_work_not_jobs(make_client):
    default, one_image = units(), units(count=1)
    assert (default, one_image) == (100, 25)
    client = make_client(api_keys=KEYS["a"], quota_queued_units=10 * default)
    assert [submit(client, "a").status_code for _ in range(6)] == [202] * 6
    costly = submit(client, "a", count=24, steps=20)  # 600 units: fewer images than 6 default jobs hold
    assert costly.status_code == 429 and costly.json()["limit"] == "queued_units"
    assert costly.json()["allowed"] == 1000 and "costs 600 work units" in costly.json()["detail"]
    assert [submit(client, "a").status_code for _ in range(4)] == [202] * 4  # 10 default requests in all
    refused = submit(client, "a", count=1)
    assert refused.status_code == 429 and refused.json()["limit"] == "queued_units"


def test_units_per_minute_refill_in_units(make_client):
    client = make_client(api_keys=KEYS["a"], quota_units_per_minute=400)
    started = time.monotonic()
    assert [submit(client, "a").status_code for _ in range(4)] == [202] * 4  # 4 x 100 units: the burst
    default, one_image = submit(client, "a"), submit(client, "a", count=1)
    elapsed = time.monotonic() - started
    assert default.status_code == one_image.status_code == 429
    assert default.json()["limit"] == one_image.json()["limit"] == "units_per_minute"
    # a refused request waits until its own units have come back: 400 units a minute = 0.15 s per unit,
    # less what has passed since the first submission, rounded up
    for refused, wait_s in ((default, 100 * 0.15), (one_image, 25 * 0.15)):
        assert math.ceil(wait_s - elapsed) <= int(refused.headers["Retry-After"]) <= math.ceil(wait_s)


def test_per_key_overrides_replace_the_defaults(make_client):
    override = {key_id(KEYS["b"]): {"queued_jobs": 1}}
    client = make_client(api_keys=f"{KEYS['a']},{KEYS['b']}", quota_overrides=override)
    assert submit(client, "b").status_code == 202
    assert submit(client, "b").json()["limit"] == "queued_jobs"
    assert [submit(client, "a").status_code for _ in range(3)] == [202] * 3


def test_overrides_must_name_key_ids_not_keys(redis_url):
    with pytest.raises(ValidationError, match="key ids"):
        Settings(redis_url=redis_url, quota_overrides={KEYS["a"]: {"queued_jobs": 1}})


def test_keys_take_turns_whatever_their_backlog(keyed, conn):
    publish_model(conn)
    flood = [submit(keyed, "a", seed=i).json()["job_id"] for i in range(6)]
    single = submit(keyed, "b").json()["job_id"]
    body = keyed.get(f"/jobs/{flood[5]}", headers=auth("a")).json()
    assert body["queue_position"] == 4  # a's own jobs ahead of it (the first was handed to the RQ queue)
    worker = FakeWorker(conn)
    worker.drain()
    # a's first job was already in the RQ queue; then b, whose first job came after a was last served.
    assert worker.behaviour.runs[:3] == [flood[0], single, flood[1]]
    assert worker.behaviour.runs[2:] == flood[1:]


def test_key_labels_are_keyed_hashes_of_bounded_cardinality():
    few = KeyLabels(Settings(api_keys="k1,k2", metrics_key_labels=2))
    label = few(key_id("k1"))
    assert re.fullmatch(r"[0-9a-f]{12}", label) and few(key_id("k2")) != label and few(None) == "anonymous"
    assert label not in key_id("k1") and label not in hashlib.sha256(key_id("k1").encode()).hexdigest()
    many = KeyLabels(Settings(api_keys=",".join(f"k{i}" for i in range(100)), metrics_key_labels=4))
    assert {many(key_id(f"k{i}")) for i in range(100)} == {f"bucket-{i}" for i in range(4)}
    assert KeyLabels(Settings())(key_id("k1")) == "anonymous"  # an open API: no secret to label with


def test_the_label_secret_decides_the_labels():
    k1 = key_id("k1")
    secret = KeyLabels(Settings(api_keys="k1,k2", metrics_label_secret="one-deployment-secret"))
    assert secret(k1) == KeyLabels(Settings(api_keys="k1", metrics_label_secret="one-deployment-secret"))(k1)
    assert secret(k1) != KeyLabels(Settings(api_keys="k1,k2", metrics_label_secret="another-deployment"))(k1)
    # unset: derived from the set of keys (API and admin, in any order), so another deployment labels k1 apart
    derived = KeyLabels(Settings(api_keys="k1,k2"))(k1)
    assert derived == KeyLabels(Settings(api_keys="k2", admin_api_keys="k1"))(k1)
    assert derived != KeyLabels(Settings(api_keys="k1,k3"))(k1) and derived != secret(k1)
    with pytest.raises(ValidationError, match="METRICS_LABEL_SECRET must be at least 16 characters"):
        Settings(metrics_label_secret="too-short")


def submitted_label(client) -> str:
    """The one key label of ``facegen_api_key_jobs_submitted_total`` on the app's /metrics."""
    (label,) = re.findall(r'facegen_api_key_jobs_submitted_total\{key="([^"]+)"\}', client.get("/metrics").text)
    return label


def test_replicas_sharing_a_secret_label_a_key_alike(make_client):
    keys = f"{KEYS['a']},{KEYS['b']}"
    replicas = [make_client(api_keys=keys, metrics_label_secret="shared-by-the-replicas") for _ in range(2)]
    elsewhere = make_client(api_keys=keys, metrics_label_secret="another-deployment-secret")
    for client in (*replicas, elsewhere):
        assert submit(client, "a").status_code == 202
    first, second, other = (submitted_label(client) for client in (*replicas, elsewhere))
    assert first == second and other != first


def test_metrics_count_work_by_key_label_never_by_key_or_key_id(make_client):
    client = make_client(api_keys=f"{KEYS['a']},{KEYS['b']}", quota_queued_jobs=1)
    submit(client, "a", count=3)
    assert submit(client, "a").status_code == 429
    text = client.get("/metrics").text
    label = KeyLabels(Settings(api_keys=f"{KEYS['a']},{KEYS['b']}"))(key_id(KEYS["a"]))
    assert key_id(KEYS["a"])[:12] not in text and key_id(KEYS["b"])[:12] not in text
    assert f'facegen_api_key_jobs_submitted_total{{key="{label}"}} 1.0' in text
    assert f'facegen_api_key_images_submitted_total{{key="{label}"}} 3.0' in text
    assert f'facegen_api_key_jobs_rejected_total{{key="{label}",reason="queued_jobs"}} 1.0' in text
    assert 'facegen_api_jobs_rejected_total{reason="queued_jobs"} 1.0' in text
    assert f'facegen_queue_key_jobs{{key="{label}",queue="facegen"}}' in text
    assert 'facegen_queue_depth{queue="facegen"} 1.0' in text  # the job handed to the RQ queue
    assert all(key not in text for key in KEYS.values())
