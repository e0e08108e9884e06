"""/models, /healthz and /readyz read the model registry that live workers publish in Redis (one entry per loaded
version, one per worker); /readyz answers from a check at most READYZ_CACHE_S old. The model store's side of GET
/models: test_models_store.py."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from facegen.contract import spec
from facegen.contract.artifacts import ArtifactStoreUnavailable
from service.api.routes.health import ReadinessCache
from service.schemas import Readiness
from tests.service.fakeworker import model_info, publish_model, publish_worker


def test_models_empty_without_workers(client):
    assert client.get("/models").json() == {"models": [], "latest": None, "workers": [], "store": None}
    assert client.get("/models/latest").status_code == 404


def test_models_lists_registry_entries(client, conn):
    publish_model(conn, model_info("v1", is_latest=False))
    publish_model(conn, model_info("v2", attributes=["Smiling", "Eyeglasses"], resolution=64))
    conn.set(spec.model_registry_key("broken"), b"{not json", ex=60)  # a bad entry is skipped
    conn.sadd(spec.MODEL_INDEX_KEY, "broken")
    body = client.get("/models").json()
    assert body["latest"] == "v2"
    assert [m["version"] for m in body["models"]] == ["v1", "v2"]
    v2 = body["models"][1]
    assert v2["labels"] == ["smiling", "not_smiling", "eyeglasses", "not_eyeglasses"]
    assert v2["resolution"] == 64 and v2["is_latest"] is True
    assert v2["default_guidance_scale"] == 3.0 and v2["default_steps"]["dpmpp"] == 20
    assert v2["device"] == "cpu" and v2["dtype"] == "float32"
    assert client.get("/models/latest").json()["version"] == "v2"
    assert client.get("/models/v1").json()["is_latest"] is False
    assert client.get("/models/v3").status_code == 404


def test_registry_entries_expire(client, conn):
    publish_model(conn, ttl=60)
    assert client.get("/models").json()["latest"] == "fake-v1"
    conn.delete(spec.model_registry_key("fake-v1"))  # what the TTL does when the worker stops refreshing
    assert client.get("/models").json()["latest"] is None


def test_healthz_is_always_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_needs_a_worker_serving_latest(make_client, conn):
    client = make_client(readyz_cache_s=0)  # every call checks
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["redis"] is True
    assert "no live worker" in response.json()["reason"]
    publish_model(conn, model_info("v1", is_latest=False))
    assert client.get("/readyz").status_code == 503  # a worker, but not for the default model
    publish_model(conn, model_info("v2"))
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "redis": True, "latest_model": "v2", "reason": None,
                            "artifact_store": True, "workers": []}


def test_a_version_a_live_worker_serves_is_latest_whatever_its_shared_entry_says(make_client, conn):
    """Two workers on either side of a roll-out share v1's entry; the one that wrote it last serves v2, so the
    entry says v1 is not latest, while the other worker still serves v1 for "latest"."""
    client = make_client(readyz_cache_s=0)
    publish_model(conn, model_info("v1", is_latest=False))
    publish_model(conn, model_info("v2"))
    assert client.get("/models/v1").json()["is_latest"] is False
    old = publish_worker(conn, "worker-old", serves="v1", model_version="stable")
    new = publish_worker(conn, "worker-new", serves="v2", model_version="stable", loaded=["v1", "v2"])
    conn.set(spec.worker_registry_key("broken"), b"{not json", ex=60)  # a bad entry is skipped
    conn.sadd(spec.WORKER_INDEX_KEY, "broken", "expired")  # "expired": a name whose entry is gone
    body = client.get("/models").json()
    assert [(m["version"], m["is_latest"]) for m in body["models"]] == [("v1", True), ("v2", True)]
    assert body["latest"] == "v2"  # the newest of those served for "latest"
    assert body["models"][0]["workers"] == ["fake-worker", "worker-new", "worker-old"]
    assert body["models"][1]["workers"] == ["fake-worker", "worker-new"]
    assert body["workers"] == [new.model_dump(), old.model_dump()]
    assert client.get("/readyz").json()["workers"] == body["workers"]
    conn.delete(spec.model_registry_key("v2"))  # the new worker stops; the old one serves on
    conn.delete(spec.worker_registry_key("worker-new"))
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["latest_model"] == "v1"
    assert ready.json()["workers"] == [old.model_dump()]


def test_readyz_without_redis(make_client):
    client = make_client(redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.5)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["redis"] is False and response.json()["workers"] is None
    assert client.get("/healthz").status_code == 200


def counted(monkeypatch: pytest.MonkeyPatch, obj: object, method: str) -> list[None]:
    """Wraps ``obj.method`` (on that object alone) so that each call appends to the returned list."""
    calls: list[None] = []
    real = getattr(obj, method)

    def counting(*args, **kwargs):
        calls.append(None)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, method, counting)
    return calls


def test_readyz_checks_once_per_window_and_sees_changes_after_it(make_client, conn, monkeypatch):
    client = make_client(readyz_cache_s=2)
    publish_model(conn)
    cache, services = client.app.state.readiness, client.app.state.services
    now = [1000.0]
    cache.clock = lambda: now[0]  # seconds, advanced by the test
    redis_pings = counted(monkeypatch, services.redis, "ping")
    store_pings = counted(monkeypatch, services.artifacts, "ping")
    for _ in range(20):
        assert client.get("/readyz").json()["artifact_store"] is True
    assert len(store_pings) == 1 and len(redis_pings) == 2  # the check's and the store's (here Redis too)

    def unreachable() -> None:
        raise ArtifactStoreUnavailable("artifact store unreachable: could not reach it (ConnectTimeoutError)")

    monkeypatch.setattr(services.artifacts, "ping", unreachable)  # the store goes away
    conn.delete(spec.model_registry_key("fake-v1"))  # and so does the worker
    now[0] += 1.9
    assert client.get("/readyz").status_code == 200  # still the check of 1.9 s ago
    now[0] += 0.1
    gone = client.get("/readyz")
    assert gone.status_code == 503 and "no live worker" in gone.json()["reason"]
    publish_model(conn)
    assert client.get("/readyz").status_code == 503  # an unready answer is kept for the window too
    now[0] += 2
    back = client.get("/readyz")
    assert back.status_code == 200 and back.json()["artifact_store"] is False


def test_concurrent_probes_share_one_check():
    cache = ReadinessCache(1.0, clock=lambda: 0.0)
    checks: list[None] = []
    together = threading.Barrier(8)

    def check() -> Readiness:
        checks.append(None)
        time.sleep(0.05)  # long enough for the other probes to arrive meanwhile
        return Readiness(status="ready", redis=True)

    def probe(_: int) -> Readiness:
        together.wait()
        return cache.get(check)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(probe, range(8)))
    assert len(checks) == 1 and all(answer is answers[0] for answer in answers)
