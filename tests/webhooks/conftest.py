"""A webhook receiver for the tests: a real HTTP server (in a thread) that checks every signature with the Standard
Webhooks reference library and fails the first attempts of each delivery on purpose; other local HTTP servers
(slow, dripping, big answers); the delivery process; and each API key's secret, derived here independently of the
service's code (receivers hold these secrets: the derivation must not change under them)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from standardwebhooks import Webhook, WebhookVerificationError

from scripts.processes import stop_process
from tests.conftest import ROOT


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


SECRET = new_secret()


def key_id(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


def tenant_secret(master: str, key: str | None) -> str:
    """The secret of API key id ``key``'s deliveries (``None``: the open API's) under master secret ``master``:
    HMAC-SHA256 of the master key and a versioned label followed by the key id (``anonymous`` when open)."""
    master_key = base64.b64decode(master.removeprefix("whsec_"))
    label = b"facegen webhook signing key v1\0" + (key or "anonymous").encode()
    return "whsec_" + base64.b64encode(hmac.new(master_key, label, hashlib.sha256).digest()).decode()


def verifies(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


@dataclass
class Receiver:
    """Answers 503 to the first ``fail_first`` attempts of each ``webhook-id``, then 204; keeps what it got.
    Verifies each signature with ``secret`` (when ``None``, every request is taken as is); keeps every request."""

    fail_first: int = 2
    secret: str | None = None
    attempts: Counter = field(default_factory=Counter)  # webhook-id -> attempts seen
    delivered: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))  # job id -> payloads (2xx)
    requests: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)  # every request: (body, headers)
    forged: int = 0  # requests whose signature did not verify
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, body: bytes, headers: dict[str, str]) -> int:
        with self.lock:
            self.requests.append((body, headers))
        try:
            payload = Webhook(self.secret).verify(body, headers) if self.secret else json.loads(body)
        except WebhookVerificationError:
            with self.lock:
                self.forged += 1
            return 401
        with self.lock:
            message_id = headers["webhook-id"]
            self.attempts[message_id] += 1
            if self.attempts[message_id] <= self.fail_first:
                return 503
            self.delivered[payload["data"]["job_id"]].append(payload)
            return 204

    def serve(self) -> tuple[ThreadingHTTPServer, str]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = receiver.handle(body, {k.lower(): v for k, v in self.headers.items()})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}/hooks"


class LocalServer:
    """An HTTP server on 127.0.0.1 (a thread per connection) whose POST handler is ``respond(handler, server)``
    (the request's body already read); counts the requests in flight and their peak. ``stop()`` also ends the
    handlers still answering (they watch ``stopping``)."""

    def __init__(self, respond: Callable[[BaseHTTPRequestHandler, LocalServer], None]):
        self.respond = respond
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = self.peak = self.requests = 0
        self.finished: list[float] = []  # monotonic times at which answers ended
        self.hung_up = threading.Event()  # a client closed its connection while an answer was being written
        local = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with local.lock:
                    local.requests += 1
                    local.in_flight += 1
                    local.peak = max(local.peak, local.in_flight)
                try:
                    local.respond(self, local)
                except OSError:  # the client went away (e.g. at its deadline)
                    local.hung_up.set()
                finally:
                    with local.lock:
                        local.in_flight -= 1
                        local.finished.append(time.monotonic())
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def drip_headers(handler: BaseHTTPRequestHandler, server: LocalServer, every_s: float = 0.1) -> None:
    """A status line, then one header line every ``every_s`` seconds, never the blank line that ends them."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
    n = 0
    while not server.stopping.wait(every_s):
        handler.wfile.write(b"X-Drip-%d: x\r\n" % n)
        handler.wfile.flush()
        n += 1


def drip_body(status: int) -> Callable[[BaseHTTPRequestHandler, LocalServer], None]:
    """Answers ``status`` at once, then drips a body that never ends (chunked, one byte every 0.1 s)."""
    def respond(handler: BaseHTTPRequestHandler, server: LocalServer) -> None:
        handler.send_response(status)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        while not server.stopping.wait(0.1):
            handler.wfile.write(b"1\r\nx\r\n")
            handler.wfile.flush()
    return respond


def big_body(size: int) -> Callable[[BaseHTTPRequestHandler, LocalServer], None]:
    """Answers 200 with a ``size``-byte body, as fast as the client reads it."""
    def respond(handler: BaseHTTPRequestHandler, server: LocalServer) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(size))
        handler.end_headers()
        chunk = b"x" * 65536
        for start in range(0, size, len(chunk)):
            if server.stopping.is_set():
                return
            handler.wfile.write(chunk[:size - start])
    return respond


def status_after(status: int, delay_s: float = 0.0, body: bytes = b""
                 ) -> Callable[[BaseHTTPRequestHandler, LocalServer], None]:
    """Answers ``status`` (with ``body``) after ``delay_s`` seconds."""
    def respond(handler: BaseHTTPRequestHandler, server: LocalServer) -> None:
        if server.stopping.wait(delay_s):
            return
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return respond


class DeliveryProcess:
    """``python -m service.webhooks`` against ``redis_url``."""

    def __init__(self, redis_url: str, log_path: Path, **env: str):
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.webhooks"], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "REDIS_URL": redis_url, "WEBHOOK_SECRET": SECRET, "WEBHOOK_METRICS_PORT": "0",
                 "PYTHONPATH": str(ROOT), **env},
        )

    def stop(self) -> None:
        stop_process(self.process)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def payload_types(payloads: list[dict]) -> list[str]:
    return [p["type"] for p in payloads]


def dumps(value: object) -> str:
    return json.dumps(value, indent=1)[:2000]
