"""GET /jobs/{id}/events under load: at most EVENTS_MAX_STREAMS_PER_KEY streams per API key across API replicas
(Redis leases), freed when a stream ends however it ends, and one read of a queued job's state per interval per
process however many streams watch it.

Real Redis, real HTTP: two ``python -m service`` replicas for what spans processes, and apps served in this process
by a real uvicorn where the test needs to count reads inside the process. No worker runs: jobs stay queued.
"""

from __future__ import annotations

import json
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import uvicorn
from rq.job import Job

from facegen.contract.job_serializer import refusal
from scripts.processes import free_port
from service.api.routes import events
from service.app import create_app
from service.config import Settings
from service.event_leases import leases_key
from service.tenancy import key_id
from tests.conftest import flushed_database, redis_url_for_db
from tests.reliability.conftest import wait_for
from tests.service.conftest import LiveServer
from tests.service.fakeworker import publish_model

REDIS_URL = redis_url_for_db(3)
KEYS = {name: f"{name}-{secrets.token_urlsafe(16)}" for name in ("a", "b")}
PER_KEY = 2


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def held_by(conn: redis.Redis, name: str) -> int:
    """The stream leases key ``name`` holds in Redis (lapsed ones included until the next take drops them)."""
    return conn.zcard(leases_key(key_id(KEYS[name].encode())))


@pytest.fixture(scope="module")
def conn() -> Iterator[redis.Redis]:
    for connection in flushed_database(REDIS_URL):
        publish_model(connection, ttl=600)  # a live worker's registry entry: POST /generate accepts; nothing runs
        yield connection


@pytest.fixture(scope="module")
def replicas(conn) -> Iterator[list[LiveServer]]:
    """Two API processes on one Redis, as two replicas behind a load balancer."""
    env = {"API_KEYS": ",".join(KEYS.values()), "EVENTS_MAX_STREAMS_PER_KEY": str(PER_KEY),
           "EVENTS_KEEPALIVE_S": "1"}
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: LiveServer(REDIS_URL, env=env), range(2)))
    yield servers
    for server in servers:
        server.stop()


class InProcessServer:
    """An app built here, served by a real uvicorn in a thread: its module globals are this test's, so a test
    can wrap what the app calls. Trusts X-Forwarded-For from anyone, so a test can speak from several addresses."""

    def __init__(self, settings: Settings):
        self.app = create_app(settings)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning", proxy_headers=True,
                                forwarded_allow_ips="*")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "uvicorn to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def serve(conn) -> Iterator[Callable[..., InProcessServer]]:
    servers = []

    def start(**settings) -> InProcessServer:
        servers.append(InProcessServer(Settings(**{"redis_url": REDIS_URL, "events_keepalive_s": 1, **settings})))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def submit(url: str, headers: dict[str, str] | None = None) -> str:
    response = httpx.post(f"{url}/generate", json={"label": "smiling", "count": 1}, headers=headers, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


class RawStream:
    """GET /jobs/{id}/events on a bare socket, open until :meth:`close` (FIN) or :meth:`reset` (RST: a client that
    crashed, or a network path that dropped). Opening it reads the status line and, for a 200, the first event."""

    def __init__(self, url: str, job_id: str, headers: dict[str, str] | None = None):
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        lines = [f"GET /jobs/{job_id}/events HTTP/1.1", f"Host: {parts.netloc}",
                 *(f"{name}: {value}" for name, value in (headers or {}).items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.received = b""
        while b"\r\n\r\n" not in self.received:
            self._receive()
        self.status_code = int(self.received.split(b" ", 2)[1])
        if self.status_code == 200:
            while b"\nevent: " not in self.received:
                self._receive()

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"the server closed the stream: {self.received!r}"
        self.received += chunk

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class Reader:
    """A stream read to its end in a thread, as an EventSource reads it; ``events``: ``{"id", "event", "data"}``."""

    def __init__(self, url: str, job_id: str, headers: dict[str, str] | None = None):
        self.events: list[dict] = []
        self.thread = threading.Thread(target=self._read, args=(url, job_id, headers or {}), daemon=True)
        self.thread.start()

    def _read(self, url: str, job_id: str, headers: dict[str, str]) -> None:
        current: dict = {}
        with httpx.stream("GET", f"{url}/jobs/{job_id}/events", headers=headers, timeout=60) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith(":"):
                    continue
                if line:
                    field, _, value = line.partition(": ")
                    current[field] = value
                elif current:
                    self.events.append({**current, "data": json.loads(current["data"])})
                    current = {}

    def positions(self) -> list[int | None]:
        return [e["data"]["queue_position"] for e in self.events if e["event"] == "queued"]

    def names(self) -> list[str]:
        return [e["event"] for e in self.events]


def test_a_key_at_its_limit_gets_429_on_every_replica_while_another_key_streams(replicas, conn):
    one, two = replicas
    job_a, job_b = submit(one.url, auth("a")), submit(two.url, auth("b"))
    held = [RawStream(one.url, job_a, auth("a")), RawStream(two.url, job_a, auth("a"))]  # one on each replica
    assert [stream.status_code for stream in held] == [200, 200]
    assert held_by(conn, "a") == PER_KEY
    for server in replicas:
        refused = httpx.get(f"{server.url}/jobs/{job_a}/events", headers=auth("a"), timeout=10)
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == str(Settings.model_fields["retry_after_s"].default)
        assert refused.json()["limit"] == "events_max_streams_per_key" and refused.json()["allowed"] == PER_KEY
        assert "open event streams" in refused.json()["detail"]
    others = [RawStream(server.url, job_b, auth("b")) for server in replicas]
    assert [stream.status_code for stream in others] == [200, 200]
    held[0].close()  # the client leaves: its place is free at once, on every replica
    wait_for(lambda: held_by(conn, "a") == PER_KEY - 1, 10, "the closed stream's lease to be given back")
    again = RawStream(two.url, job_a, auth("a"))
    assert again.status_code == 200
    for stream in [held[1], again, *others]:
        stream.close()
    wait_for(lambda: held_by(conn, "a") == held_by(conn, "b") == 0, 10, "every lease to be given back")


def test_a_stream_that_ends_by_itself_gives_its_place_back(replicas, conn):
    one, _ = replicas
    job = submit(one.url, auth("a"))
    readers = [Reader(one.url, job, auth("a")) for _ in range(PER_KEY)]
    wait_for(lambda: all(r.positions() for r in readers), 30, "both streams to report the queue position")
    assert httpx.delete(f"{one.url}/jobs/{job}", headers=auth("a"), timeout=10).status_code == 200
    for reader in readers:
        reader.thread.join(30)
        assert reader.names()[-1] == "canceled"
    wait_for(lambda: held_by(conn, "a") == 0, 10, "the ended streams' leases to be given back")


def test_the_leases_of_a_replica_that_died_lapse(replicas, conn):
    """Last of the replica tests: it kills one."""
    one, two = replicas
    job = submit(one.url, auth("a"))
    held = [RawStream(two.url, job, auth("a")) for _ in range(PER_KEY)]
    assert [stream.status_code for stream in held] == [200, 200]
    two.process.kill()  # no chance to give anything back
    two.process.wait()
    assert httpx.get(f"{one.url}/jobs/{job}/events", headers=auth("a"), timeout=10).status_code == 429
    tries: list[RawStream] = []

    def reopened() -> bool:
        tries.append(RawStream(one.url, job, auth("a")))
        return tries[-1].status_code == 200

    # EVENTS_KEEPALIVE_S=1: a lease lapses 2 x 1 + LEASE_MARGIN_S seconds after its last renewal
    wait_for(reopened, 30, "the dead replica's leases to lapse", poll=1)
    for stream in held + tries:
        stream.close()


def test_a_client_that_resets_the_connection_gives_its_place_back(serve, conn):
    """A lease outlives its holder by 2 x EVENTS_KEEPALIVE_S + 5 s (65 s here) before it lapses: a place free
    within 20 s was given back, not lapsed."""
    server = serve(api_keys=KEYS["a"], events_max_streams_per_key=1, events_keepalive_s=30)
    job = submit(server.url, auth("a"))
    first = RawStream(server.url, job, auth("a"))
    assert first.status_code == 200
    assert RawStream(server.url, job, auth("a")).status_code == 429
    first.reset()
    wait_for(lambda: held_by(conn, "a") == 0, 20, "the reset stream's lease to be given back")
    assert server.app.state.event_streams.open == 0
    second = RawStream(server.url, job, auth("a"))
    assert second.status_code == 200
    second.close()
    wait_for(lambda: held_by(conn, "a") == 0, 20, "the closed stream's lease to be given back")


def test_an_open_api_counts_streams_per_client_address(serve, conn):
    server = serve(events_max_streams_per_key=1)
    job = submit(server.url)
    first = RawStream(server.url, job, {"X-Forwarded-For": "203.0.113.7"})
    assert first.status_code == 200
    assert conn.zcard(leases_key("addr:203.0.113.7")) == 1
    refused = httpx.get(f"{server.url}/jobs/{job}/events", headers={"X-Forwarded-For": "203.0.113.7"}, timeout=10)
    assert refused.status_code == 429 and refused.json()["limit"] == "events_max_streams_per_key"
    other = RawStream(server.url, job, {"X-Forwarded-For": "198.51.100.9"})
    assert other.status_code == 200
    for stream in (first, other):
        stream.close()


def test_ten_streams_of_a_queued_job_share_one_read_per_interval(serve, conn, monkeypatch):
    """Every read of the job's state waits at a gate the test opens one read at a time: all ten streams report
    each position after a single read."""
    real_read = events._state_before_entries
    gate, counted = threading.Semaphore(0), threading.Lock()
    reads = {"started": 0, "done": 0}

    def gated_read(connection, job_id):
        with counted:
            reads["started"] += 1
        assert gate.acquire(timeout=60)
        state = real_read(connection, job_id)
        with counted:
            reads["done"] += 1
        return state

    monkeypatch.setattr(events, "_state_before_entries", gated_read)
    server = serve()
    ahead, job = submit(server.url), submit(server.url)
    try:
        readers = [Reader(server.url, job) for _ in range(10)]
        wait_for(lambda: reads["started"] == 1, 10, "the first read")
        gate.release()
        wait_for(lambda: all(r.positions() for r in readers), 30, "every stream to report the queue position")
        position = readers[0].positions()[0]  # earlier tests' jobs may wait ahead too
        assert reads["done"] == 1 and all(r.positions() == [position] for r in readers)
        assert httpx.delete(f"{server.url}/jobs/{ahead}", timeout=10).status_code == 200
        gate.release()
        wait_for(lambda: all(len(r.positions()) == 2 for r in readers), 30, "every stream to report the new position")
        assert all(r.positions() == [position, position - 1] for r in readers)
        assert reads["done"] == 2 and reads["started"] <= 3  # the third waits at the gate
        assert server.app.state.event_streams.polls.polling() == 1
        assert httpx.delete(f"{server.url}/jobs/{job}", timeout=10).status_code == 200
        for reader in readers:
            reader.thread.join(30)
            assert reader.names() == ["queued", "queued", "canceled"]
        wait_for(lambda: server.app.state.event_streams.polls.polling() == 0, 10, "the poller to stop")
    finally:
        for _ in range(10):
            gate.release()


@pytest.mark.parametrize("part", ["data", "meta"])
def test_a_job_whose_stored_part_is_not_json_streams_one_failed_event(serve, conn, part):
    server = serve()
    job = submit(server.url)
    conn.hset(Job.key_for(job), part, b"\x80\x04\x95not json")  # e.g. a pickle written by someone else
    reader = Reader(server.url, job)
    reader.thread.join(30)
    assert [(e["event"], e["data"]) for e in reader.events] == [
        ("failed", {"status": "failed", "error": refusal(part)})]


def test_a_queued_job_overwritten_while_streamed_ends_its_streams_failed(serve, conn):
    server = serve()
    job = submit(server.url)
    reader = Reader(server.url, job)
    wait_for(reader.positions, 30, "the queue position")
    conn.hset(Job.key_for(job), "data", b"not json")
    reader.thread.join(30)
    assert reader.names() == ["queued", "failed"]
    assert reader.events[-1]["data"]["error"] == refusal("data")
