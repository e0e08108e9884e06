"""Webhooks of several API keys through ``python -m service`` (uvicorn) and two ``python -m service.webhooks`` on a
real Redis: each key signs with its own secret (derived from the master secret and its key id, read from ``GET
/webhooks/secret``), which no other key's delivery verifies with; during a rotation every delivery carries a
signature for the old and for the new secret; and a key whose receiver is slow holds at most
``WEBHOOK_TENANT_CONCURRENCY`` delivery processes, so another key's deliveries go out meanwhile."""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.app import create_app
from service.config import Settings
from service.webhooks import signing
from tests.conftest import flushed_database, redis_url_for_db
from tests.reliability.conftest import wait_for
from tests.service.conftest import LiveServer
from tests.webhooks.conftest import (
    DeliveryProcess,
    LocalServer,
    Receiver,
    key_id,
    new_secret,
    status_after,
    tenant_secret,
    verifies,
)

REDIS_URL = redis_url_for_db(11)
KEYS = {"a": "key-a-0123456789abcdef", "b": "key-b-0123456789abcdef"}
NEW, OLD = new_secret(), new_secret()  # the master secret, and the one it replaces (a rotation is under way)
BODY = {"label": "smiling", "count": 1, "steps": 2}
SLOW_S = 2.0  # the slow receiver answers each request after this long


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture(scope="module")
def conn():
    yield from flushed_database(REDIS_URL)


@pytest.fixture(scope="module")
def stack(conn, tmp_path_factory):
    receiver = Receiver(fail_first=0)  # keeps every request; the tests verify them
    server, url = receiver.serve()
    slow = LocalServer(status_after(204, delay_s=SLOW_S))
    logs = tmp_path_factory.mktemp("webhook-tenants")
    env = {"API_KEYS": ",".join(KEYS.values()), "WEBHOOK_SECRET": NEW, "WEBHOOK_SECRET_PREVIOUS": OLD,
           "WEBHOOK_ALLOW_PRIVATE": "true", "WEBHOOK_ALLOWED_PORTS": f"{url.split(':')[2].split('/')[0]},{slow.port}",
           "WEBHOOK_SWEEP_INTERVAL_S": "1", "WEBHOOK_RETRY_INTERVALS": "1", "WEBHOOK_TENANT_CONCURRENCY": "1"}
    api = LiveServer(REDIS_URL, env=env)
    deliveries = [DeliveryProcess(REDIS_URL, logs / f"webhooks-{n}.log", **env) for n in range(2)]
    yield {"api": api.url, "receiver": receiver, "url": url, "slow": slow, "deliveries": deliveries}
    api.stop()
    for delivery in deliveries:
        delivery.stop()
    server.shutdown()
    slow.stop()


def canceled_job(api: str, who: str, url: str) -> str:
    """A job of key ``who`` (no worker: it stays queued) canceled at once, so its webhook is delivered now."""
    accepted = httpx.post(f"{api}/generate", json={**BODY, "webhook": {"url": url}}, headers=auth(who), timeout=10)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    assert httpx.delete(f"{api}/jobs/{job_id}", headers=auth(who), timeout=10).status_code == 200
    return job_id


def test_each_key_reads_its_own_secrets(stack):
    answers = {}
    for who, key in KEYS.items():
        response = httpx.get(f"{stack['api']}/webhooks/secret", headers=auth(who), timeout=10)
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == "no-store"
        answers[who] = response.json()
        assert answers[who] == {"key_id": key_id(key), "secret": tenant_secret(NEW, key_id(key)),
                                "previous_secret": tenant_secret(OLD, key_id(key))}
    assert answers["a"]["secret"] != answers["b"]["secret"]
    assert NEW not in (answers["a"]["secret"], answers["b"]["secret"])
    assert httpx.get(f"{stack['api']}/webhooks/secret", timeout=10).status_code == 401


def test_a_keys_deliveries_verify_with_its_secrets_and_no_other(stack):
    """Key b cannot forge key a's events: a's deliveries verify with a's new and old secrets (two signatures
    while the rotation lasts), with neither of b's, nor with the master secrets."""
    jobs = {who: canceled_job(stack["api"], who, stack["url"]) for who in KEYS}
    receiver = stack["receiver"]
    wait_for(lambda: all(receiver.delivered.get(job_id) for job_id in jobs.values()), 30, "both deliveries")
    secrets = {who: {"new": tenant_secret(NEW, key_id(key)), "old": tenant_secret(OLD, key_id(key))}
               for who, key in KEYS.items()}
    for who, job_id in jobs.items():
        ((body, headers),) = [(b, h) for b, h in receiver.requests if h["webhook-id"] == f"{job_id}-webhook"]
        assert len(headers["webhook-signature"].split(" ")) == 2, headers
        assert all(part.startswith("v1,") for part in headers["webhook-signature"].split(" "))
        other = "b" if who == "a" else "a"
        assert verifies(secrets[who]["new"], body, headers) and verifies(secrets[who]["old"], body, headers)
        assert not any(verifies(s, body, headers) for s in (*secrets[other].values(), NEW, OLD))


def test_outside_a_rotation_deliveries_carry_one_signature():
    settings = Settings(webhook_secret=SecretStr(NEW))
    keys = signing.tenant_keys(settings, key_id(KEYS["a"]))
    assert [signing.as_secret(k) for k in keys] == [tenant_secret(NEW, key_id(KEYS["a"]))]
    body, now = b'{"type":"job.completed"}', int(time.time())
    headers = signing.headers(keys, "msg_1", now, body)
    assert " " not in headers["webhook-signature"]
    assert verifies(tenant_secret(NEW, key_id(KEYS["a"])), body, headers)
    assert not verifies(tenant_secret(OLD, key_id(KEYS["a"])), body, headers)
    with TestClient(create_app(Settings(redis_url=REDIS_URL, webhook_secret=SecretStr(NEW)))) as client:
        assert client.get("/webhooks/secret").json() == {"key_id": None, "secret": tenant_secret(NEW, None),
                                                         "previous_secret": None}


def test_without_a_secret_there_is_none_to_read():
    with TestClient(create_app(Settings(redis_url=REDIS_URL, webhook_secret_previous=SecretStr(OLD)))) as client:
        response = client.get("/webhooks/secret")
    assert response.status_code == 404
    assert response.json() == {"detail": "webhooks are off on this server (it has no WEBHOOK_SECRET)"}


def test_a_malformed_previous_secret_is_refused_naming_it():
    with pytest.raises(ValueError, match="WEBHOOK_SECRET_PREVIOUS must be 'whsec_'"):
        Settings(webhook_secret=SecretStr(NEW), webhook_secret_previous=SecretStr("abc"))


def test_a_slow_receiver_holds_back_only_its_own_keys_deliveries(stack):
    """Key a's 4 deliveries go to a receiver that takes 2 s per request, key b's one to a prompt one; with two
    delivery processes and WEBHOOK_TENANT_CONCURRENCY=1, a never has two attempts in flight (the other process
    puts a's next delivery back for later rather than waiting), and b's is delivered while a's still queue. None
    of a's deliveries spends an attempt while it waits for its turn."""
    api, slow = stack["api"], stack["slow"]
    a_jobs = [canceled_job(api, "a", slow.url) for _ in range(4)]
    b_job = canceled_job(api, "b", stack["url"])
    wait_for(lambda: stack["receiver"].delivered.get(b_job), 20, "key b's delivery")
    b_delivered = time.monotonic()
    wait_for(lambda: len(slow.finished) == 4, 60, "key a's 4 deliveries", poll=0.1)
    assert slow.peak == 1, slow.peak
    assert b_delivered < max(slow.finished), "b's delivery waited for all of a's"
    for job_id in a_jobs:
        state = httpx.get(f"{api}/jobs/{job_id}", headers=auth("a"), timeout=10).json()["webhook"]
        assert state == {"attempts": 1, "delivered": True, "last_status": 204, "last_error": None}, state
