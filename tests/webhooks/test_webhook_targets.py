"""Webhook requests through ``python -m service`` (uvicorn) on a real Redis: a bad URL or event is a 422 naming
the field, private/loopback/metadata hosts are refused (SSRF) unless ``WEBHOOK_ALLOW_PRIVATE`` (link-local ones
always), and so are the IPv6 forms of those IPv4 addresses; only ``WEBHOOK_ALLOWED_PORTS`` may be named; the
delivery process checks the port and the address again before it connects (DNS rebinding). The signatures verify
with the Standard Webhooks reference library."""

from __future__ import annotations

import ipaddress
import time

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError
from standardwebhooks import Webhook, WebhookVerificationError

from service.app import create_app
from service.config import Settings, signing_key
from service.webhooks import signing, targets
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


# IPv6 addresses that embed a private, loopback, link-local or metadata IPv4 address: IPv4-mapped, IPv4-compatible,
# NAT64 (64:ff9b::/96), 6to4 (2002::/16, the IPv4 address in bits 16-48), Teredo (the client, bit-inverted).
EMBEDDING = ["http://[::ffff:127.0.0.1]/hook", "http://[::127.0.0.1]/hook", "http://[::10.0.0.1]/hook",
             "http://[64:ff9b::127.0.0.1]/hook", "http://[64:ff9b::192.168.1.1]/hook", "http://[2002:7f00:1::]/hook",
             "http://[2002:c0a8:101::1]/hook", "http://[::ffff:169.254.169.254]/latest",
             "http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/hook"]


@pytest.mark.parametrize("url", ["http://127.0.0.1/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest",
                                 "http://localhost/hook", "http://[::1]/hook", "https://192.168.0.10/hook",
                                 *EMBEDDING])
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


def refused_at_delivery(conn, tmp_path, api_env: dict[str, str], delivery_env: dict[str, str]) -> dict:
    """A job whose webhook the API accepts (with ``api_env``) to a live local receiver, canceled while queued (no
    worker); the delivery process (with ``delivery_env``; by default it allows the receiver's port) must refuse it
    before it connects, without retrying. Returns the delivery's state and the receiver's port."""
    receiver = Receiver(fail_first=0)
    server, url = receiver.serve()
    port = url.split(":")[2].split("/")[0]
    api = LiveServer(REDIS_URL, env={"WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOWED_PORTS": port, **api_env})
    delivery = DeliveryProcess(REDIS_URL, tmp_path / "webhooks.log", WEBHOOK_SWEEP_INTERVAL_S="1",
                               **{"WEBHOOK_RETRY_INTERVALS": "0,0,0", "WEBHOOK_ALLOWED_PORTS": port, **delivery_env})
    try:
        accepted = httpx.post(f"{api.url}/generate", json={**BODY, "webhook": {"url": url}}, timeout=10)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        assert httpx.delete(f"{api.url}/jobs/{job_id}", timeout=10).status_code == 200  # no worker: still queued
        state = wait_for(lambda: (s := webhook_state(api.url, job_id))["attempts"] and s, 30, "the attempt")
        assert state["delivered"] is False and state["attempts"] == 1, state
        wait_for(lambda: conn.hget(f"rq:job:{job_id}-webhook", "status") == b"failed", 30, "the delivery to fail")
        assert webhook_state(api.url, job_id)["attempts"] == 1  # not retried
        assert not receiver.attempts
        return {**state, "port": port}
    finally:
        api.stop()
        delivery.stop()
        server.shutdown()


def test_the_private_address_check_is_repeated_at_delivery(conn, tmp_path):
    """The API lets a private receiver through (WEBHOOK_ALLOW_PRIVATE), the delivery process does not: the
    delivery is refused before it connects and not retried."""
    state = refused_at_delivery(conn, tmp_path, {"WEBHOOK_ALLOW_PRIVATE": "true"}, {})
    assert state["last_error"].startswith("refused: 127.0.0.1 is a loopback address"), state


def test_the_port_check_is_repeated_at_delivery(conn, tmp_path):
    """The API lets the receiver's port through (WEBHOOK_ALLOWED_PORTS names it), the delivery process, with the
    default ports, does not: refused before it connects, not retried, and the error names only the URL's port."""
    state = refused_at_delivery(conn, tmp_path, {"WEBHOOK_ALLOW_PRIVATE": "true"},
                                {"WEBHOOK_ALLOW_PRIVATE": "true", "WEBHOOK_ALLOWED_PORTS": "80,443"})
    assert state["last_error"] == f"refused: port {state['port']} is not allowed; webhooks only reach ports 80, 443"


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


@pytest.mark.parametrize("url", EMBEDDING)
def test_ipv6_forms_of_forbidden_ipv4_addresses_are_refused_at_delivery_too(url):
    """``resolve`` is what the delivery process checks before each attempt."""
    with pytest.raises(targets.TargetRefused, match=r"is an IPv6 form of \S+, a .*; webhooks only reach public"):
        targets.resolve(url, allow_private=False)


@pytest.mark.parametrize("address", ["64:ff9b::8.8.8.8", "2002:808:808::1", "::ffff:8.8.8.8", "2606:4700::1111",
                                     "8.8.8.8"])
def test_ipv6_forms_of_public_ipv4_addresses_pass(address):
    assert targets.refusal(ipaddress.ip_address(address), allow_private=False) is None


@pytest.mark.parametrize("url", ["http://169.254.0.1/hook", "http://169.254.255.254/hook", "http://[fe80::1]/hook",
                                 "http://[::ffff:169.254.10.10]/hook", "http://[64:ff9b::169.254.1.2]/hook",
                                 "http://169.254.169.254/latest"])
def test_link_local_addresses_are_refused_even_when_private_ones_are_allowed(url):
    with pytest.raises(targets.TargetRefused, match="(link-local|metadata) address"):
        targets.resolve(url, allow_private=True)
    assert targets.resolve("http://127.0.0.1/hook", allow_private=True)  # what the setting is for
    assert targets.resolve("http://[::ffff:10.0.0.1]/hook", allow_private=True)


def test_a_link_local_webhook_is_a_422_even_with_private_addresses_allowed(conn):
    settings = Settings(redis_url=REDIS_URL, webhook_secret=SecretStr(SECRET), webhook_allow_private=True)
    with TestClient(create_app(settings)) as client:
        response = client.post("/generate", json={**BODY, "webhook": {"url": "http://169.254.10.10/hook"}})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "webhook", "url"]
    assert "169.254.10.10 is a link-local address" in error["msg"]
    assert queued_jobs(conn) == 0


@pytest.mark.parametrize(("url", "allowed"), [
    ("http://8.8.8.8/x", (80, 443)), ("https://8.8.8.8/x", (80, 443)), ("https://8.8.8.8:443/x", (80, 443)),
    ("http://8.8.8.8:8080/x", (8080,)), ("http://127.0.0.1/x", None)])
def test_allowed_ports_pass(url, allowed):
    assert targets.resolve(url, allow_private=True, allowed_ports=allowed)


@pytest.mark.parametrize("url", ["http://8.8.8.8:8080/x", "https://8.8.8.8:8443/x", "http://8.8.8.8:22/x",
                                 "http://no-such-host.invalid:25/x"])
def test_other_ports_are_refused_before_any_lookup(url):
    port = url.split(":")[2].split("/")[0]
    with pytest.raises(targets.TargetRefused, match=f"^port {port} is not allowed; webhooks only reach ports 80, 443$"):
        targets.resolve(url, allow_private=True, allowed_ports=(80, 443))


def test_allowed_ports_setting():
    assert Settings().webhook_allowed_ports == (80, 443)
    assert Settings(webhook_allowed_ports="443, 8443").webhook_allowed_ports == (443, 8443)
    for bad in ("0", "65536", "https", ","):
        with pytest.raises(ValidationError, match="webhook_allowed_ports"):
            Settings(webhook_allowed_ports=bad)


def test_a_port_not_allowed_is_a_422_naming_the_url(conn):
    with TestClient(create_app(Settings(redis_url=REDIS_URL, webhook_secret=SecretStr(SECRET)))) as client:
        response = client.post("/generate", json={**BODY, "webhook": {"url": "https://8.8.8.8:8443/hook"}})
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "webhook", "url"]
        assert error["msg"] == "port 8443 is not allowed; webhooks only reach ports 80, 443"
