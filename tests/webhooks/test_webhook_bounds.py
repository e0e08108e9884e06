"""What one delivery attempt may cost, against real local HTTP servers on 127.0.0.1: it ends by its deadline
(``WEBHOOK_TIMEOUT_S`` for connect, send and the answer's status and headers) however slowly a receiver drips its
answer, it reads at most 64 KiB of the answer's body, it takes one of its API key's slots (Redis, shared by every
delivery process) and what it records for the client says nothing about the receiver's network beyond
``HTTP <status>`` or one generic line."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from service.config import Settings
from service.webhooks import sender, targets
from tests.conftest import flushed_database, redis_url_for_db
from tests.reliability.conftest import wait_for
from tests.service.conftest import LiveServer, free_port
from tests.webhooks.conftest import (
    SECRET,
    DeliveryProcess,
    LocalServer,
    big_body,
    drip_body,
    drip_headers,
    status_after,
)

REDIS_URL = redis_url_for_db(5)
BODY = {"label": "smiling", "count": 1, "steps": 2}
LOOPBACK = targets.resolve("http://127.0.0.1/", allow_private=True)[0]
DEADLINE_S = 1.0


@pytest.fixture(scope="module")
def conn():
    yield from flushed_database(REDIS_URL)


def post_in_thread(url: str, timeout_s: float, wait_s: float) -> dict[str, Any]:
    """``sender.post`` in a daemon thread, waited for ``wait_s`` at most (so that an attempt that never ends fails
    the test instead of hanging it): ``{"answer" or "error", "ended"}``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["answer"] = sender.post(url, LOOPBACK, b'{"type":"job.completed"}', {"webhook-id": "x"},
                                            timeout_s)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(wait_s)
    outcome["ended"] = not thread.is_alive()
    return outcome


def test_an_attempt_ends_by_its_deadline_however_slowly_the_receiver_drips_its_headers():
    """A header line every 0.1 s: each read is quick, so read timeouts alone would never fire. The receiver never
    stops: the attempt ended because the sender hung up on it."""
    server = LocalServer(drip_headers)
    try:
        outcome = post_in_thread(server.url, DEADLINE_S, wait_s=DEADLINE_S + 10)
        wait_for(server.hung_up.is_set, 10, "the receiver to see the sender hang up")
    finally:
        server.stop()
    assert outcome["ended"], "the attempt was still running 10 s after its deadline"
    assert isinstance(outcome.get("error"), TimeoutError), outcome


@pytest.mark.parametrize("status", [200, 500])
def test_an_answer_whose_body_drips_counts_by_its_status_at_the_deadline(status):
    server = LocalServer(drip_body(status))
    try:
        outcome = post_in_thread(server.url, DEADLINE_S, wait_s=DEADLINE_S + 10)
        wait_for(server.hung_up.is_set, 10, "the receiver to see the sender hang up")
    finally:
        server.stop()
    assert outcome["ended"], "the attempt was still running 10 s after its deadline"
    assert outcome["answer"].status_code == status, outcome
    assert 0 < len(outcome["answer"].body) < 100, outcome


def test_at_most_64_kib_of_an_answer_is_read():
    server = LocalServer(big_body(64 * 1024 * 1024))
    try:
        outcome = post_in_thread(server.url, timeout_s=30, wait_s=40)
        wait_for(server.hung_up.is_set, 10, "the receiver to see the sender hang up before the 64 MiB were read")
    finally:
        server.stop()
    assert outcome["ended"] and "answer" in outcome, outcome
    assert outcome["answer"].status_code == 200
    assert len(outcome["answer"].body) == sender.MAX_RESPONSE_BYTES == 64 * 1024


def test_a_keys_slots_are_limited_shared_renewable_and_expire(conn):
    settings = Settings(webhook_tenant_concurrency=2)
    key = sender.slots_key("a" * 32)
    assert sender.acquire_slot(conn, "a" * 32, "one", settings)
    assert sender.acquire_slot(conn, "a" * 32, "two", settings)
    assert not sender.acquire_slot(conn, "a" * 32, "three", settings)  # the limit
    assert sender.acquire_slot(conn, "b" * 32, "three", settings)  # another key's slots are its own
    assert sender.acquire_slot(conn, "a" * 32, "one", settings)  # a holder (a rerun delivery) renews its slot
    sender.release_slot(conn, "a" * 32, "one")
    assert sender.acquire_slot(conn, "a" * 32, "three", settings)
    assert 0 < conn.pttl(key) <= (settings.webhook_timeout_s + sender.SLOT_MARGIN_S) * 1000
    conn.zadd(key, {"two": 0})  # its holder died: its slot has expired
    assert sender.acquire_slot(conn, "a" * 32, "four", settings)
    assert {m.decode() for m in conn.zrange(key, 0, -1)} == {"three", "four"}


# ----- through the delivery process ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers():
    servers = {"drip": LocalServer(drip_headers),
               "error": LocalServer(status_after(500, body=b"db 10.0.0.5:5432 down, see /var/log/app.log"))}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def stack(conn, servers, tmp_path_factory):
    closed = free_port()  # nothing listens there
    ports = ",".join(str(p) for p in [closed, *(s.port for s in servers.values())])
    env = {"WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOW_PRIVATE": "true", "WEBHOOK_ALLOWED_PORTS": ports}
    api = LiveServer(REDIS_URL, env=env)
    delivery = DeliveryProcess(REDIS_URL, tmp_path_factory.mktemp("webhook-bounds") / "webhooks.log",
                               WEBHOOK_SWEEP_INTERVAL_S="1", WEBHOOK_RETRY_INTERVALS="30",
                               WEBHOOK_TIMEOUT_S=str(DEADLINE_S), **env)
    yield {"api": api.url, "closed": f"http://127.0.0.1:{closed}/hooks", "delivery": delivery}
    api.stop()
    delivery.stop()


def canceled_job_with_webhook(api: str, url: str) -> str:
    """A job (no worker: it stays queued) canceled at once, so its webhook is delivered now."""
    accepted = httpx.post(f"{api}/generate", json={**BODY, "webhook": {"url": url}}, timeout=10)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    assert httpx.delete(f"{api}/jobs/{job_id}", timeout=10).status_code == 200
    return job_id


def first_attempt(api: str, job_id: str, within_s: float, delivery: DeliveryProcess) -> dict:
    def attempted() -> dict | None:
        state = httpx.get(f"{api}/jobs/{job_id}", timeout=10).json()["webhook"]
        return state if state["attempts"] else None
    try:
        return wait_for(attempted, within_s, "the first attempt to be recorded", poll=0.05)
    except AssertionError:
        raise AssertionError(delivery.output()) from None


def test_a_receiver_that_drips_its_answer_cannot_hold_a_delivery_past_its_deadline(stack, servers):
    """The receiver drips header lines until the test ends: an attempt recorded at all was ended by its deadline."""
    job_id = canceled_job_with_webhook(stack["api"], servers["drip"].url)
    state = first_attempt(stack["api"], job_id, DEADLINE_S + 10, stack["delivery"])
    assert state == {"attempts": 1, "delivered": False, "last_status": None,
                     "last_error": "delivery failed: connection error or timeout"}, state
    deadline = time.monotonic() + 10  # the handler notices the hang-up at its next write
    while servers["drip"].in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert servers["drip"].requests == 1 and servers["drip"].in_flight == 0  # the sender hung up on the drip


@pytest.mark.parametrize(("server", "expected"), [
    ("closed", {"last_status": None, "last_error": "delivery failed: connection error or timeout"}),
    ("error", {"last_status": 500, "last_error": "HTTP 500"}),
])
def test_what_a_failed_attempt_records_says_nothing_of_the_receivers_network(stack, servers, server, expected):
    """A closed port reads as a timeout or any other failure to get an answer would (no socket error, address or
    port); a 500 as its status alone (not its body)."""
    url = stack["closed"] if server == "closed" else servers[server].url
    state = first_attempt(stack["api"], canceled_job_with_webhook(stack["api"], url), 20, stack["delivery"])
    assert state == {"attempts": 1, "delivered": False, **expected}, state

