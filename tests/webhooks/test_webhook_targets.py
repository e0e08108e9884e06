"""Webhook requests through ``python -m service`` (uvicorn) on a real Redis: a bad URL or event is a 422 naming
the field, private/loopback/link-local/metadata hosts are refused (SSRF) unless ``WEBHOOK_ALLOW_PRIVATE``, and
the delivery process checks the address again before it connects (DNS rebinding). The signatures verify with the
Standard Webhooks reference library."""

from __future__ import annotations

import time

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr
from standardwebhooks import Webhook, WebhookVerificationError

from service.app import create_app
from service.config import Settings, signing_key
from service.webhooks import signing
from tests.conftest import flushed_database, redis_url_for_db
from tests.reliability.conftest import wait_for
from tests.service.conftest import LiveServer
from tests.webhooks.conftest import SECRET, DeliveryProcess, Receiver

REDIS_URL = redis_url_for_db(7)
BODY = {"label": "smiling", "count": 1, "steps": 2}


@pytest.fixture(scope="module")
def conn():
    yield from flushed_database(REDIS_URL)


@pytest.fixture(scope="module")
def strict_api(conn):
    server = LiveServer(REDIS_URL, env={"WEBHOOK_SECRET": SECRET})
    yield server
    server.stop()


def queued_jobs(conn: redis.Redis) -> int:
    return conn.llen("rq:queue:facegen")


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest",
                                 "http://localhost:9/hook", "http://[::1]/hook", "https://192.168.0.10/hook"])
def test_private_and_metadata_hosts_are_refused_with_422_naming_the_url(strict_api, conn, url):
    before = queued_jobs(conn)
    response = httpx.post(f"{strict_api.url}/generate", json={**BODY, "webhook": {"url": url}}, timeout=10)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "webhook", "url"]
    assert "public addresses" in error["msg"]
    assert queued_jobs(conn) == before


@pytest.mark.parametrize(("webhook", "loc"), [
    ({"url": "ftp://example.com/x"}, ["body", "webhook", "url"]),
    ({"url": "https://user:secret@example.com/x"}, ["body", "webhook", "url"]),
    ({"url": "not a url"}, ["body", "webhook", "url"]),
    ({"url": "https://example.com/x", "events": ["done"]}, ["body", "webhook", "events", 0]),
    ({"url": "https://example.com/x", "events": []}, ["body", "webhook", "events"]),
    ({"url": "https://example.com/x", "secret": "x"}, ["body", "webhook", "secret"]),
    ({}, ["body", "webhook", "url"]),
])
def test_a_malformed_webhook_is_a_422_naming_the_field(strict_api, conn, webhook, loc):
    response = httpx.post(f"{strict_api.url}/generate", json={**BODY, "webhook": webhook}, timeout=10)
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["detail"]] == [loc]
    assert queued_jobs(conn) == 0


def test_without_a_secret_webhooks_are_refused_naming_the_field(conn):
    with TestClient(create_app(Settings(redis_url=REDIS_URL))) as client:
        response = client.post("/generate", json={**BODY, "webhook": {"url": "https://example.com/x"}})
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["detail"]] == [["body", "webhook"]]
    assert queued_jobs(conn) == 0


def test_the_private_address_check_is_repeated_at_delivery(conn, tmp_path):
    """The API lets a private receiver through (WEBHOOK_ALLOW_PRIVATE), the delivery process does not: the
    delivery is refused before it connects and not retried."""
    receiver = Receiver(fail_first=0)
    server, url = receiver.serve()
    api = LiveServer(REDIS_URL, env={"WEBHOOK_ALLOW_PRIVATE": "true", "WEBHOOK_SECRET": SECRET})
    delivery = DeliveryProcess(REDIS_URL, tmp_path / "webhooks.log", WEBHOOK_SWEEP_INTERVAL_S="1",
                               WEBHOOK_RETRY_INTERVALS="0,0,0")
    try:
        accepted = httpx.post(f"{api.url}/generate", json={**BODY, "webhook": {"url": url}}, timeout=10)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        assert httpx.delete(f"{api.url}/jobs/{job_id}", timeout=10).status_code == 200  # no worker: still queued
        state = wait_for(lambda: (s := webhook_state(api.url, job_id))["attempts"] and s, 30, "the attempt")
        assert state["delivered"] is False and state["attempts"] == 1, state
        assert state["last_error"].startswith("refused: 127.0.0.1 is a loopback address"), state
        wait_for(lambda: conn.hget(f"rq:job:{job_id}-webhook", "status") == b"failed", 30, "the delivery to fail")
        assert webhook_state(api.url, job_id)["attempts"] == 1  # not retried
        assert not receiver.attempts
    finally:
        api.stop()
        delivery.stop()
        server.shutdown()


def webhook_state(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/jobs/{job_id}", timeout=10).json()["webhook"]


def test_signatures_verify_with_the_reference_library():
    key, body, now = signing_key(SecretStr(SECRET)), b'{"type":"job.completed","data":{"job_id":"x"}}', int(time.time())
    headers = signing.headers(key, "msg_1", now, body)  # the library refuses timestamps 5 minutes off
    assert headers["webhook-id"] == "msg_1" and headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body, headers)["type"] == "job.completed"
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b'"x"', b'"y"'), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, signing.headers(b"another key of 16+ bytes", "msg_1", now, body))


@pytest.mark.parametrize("secret", ["abc", "whsec_not base64!", "whsec_" + "QUJD"])
def test_a_malformed_secret_is_refused_naming_the_form(secret):
    with pytest.raises(ValueError, match="WEBHOOK_SECRET"):
        signing_key(SecretStr(secret))
