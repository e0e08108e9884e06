"""/models, /healthz and /readyz read the model registry that live workers publish in Redis."""

from __future__ import annotations

from facegen.contract import spec
from tests.service.fakeworker import model_info, publish_model


def test_models_empty_without_workers(client):
    assert client.get("/models").json() == {"models": [], "latest": None}
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


def test_readyz_needs_a_worker_serving_latest(client, conn):
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
                            "artifact_store": True}


def test_readyz_without_redis(make_client):
    client = make_client(redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.5)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["redis"] is False
    assert client.get("/healthz").status_code == 200
