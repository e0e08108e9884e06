"""A webhook receiver for the tests: a real HTTP server (in a thread) that checks every signature with the Standard
Webhooks reference library and fails the first attempts of each delivery on purpose; and the delivery process."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from standardwebhooks import Webhook, WebhookVerificationError

from scripts.processes import stop_process
from tests.conftest import ROOT

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Receiver:
    """Answers 503 to the first ``fail_first`` attempts of each ``webhook-id``, then 204; keeps what it got."""

    fail_first: int = 2
    attempts: Counter = field(default_factory=Counter)  # webhook-id -> attempts seen
    delivered: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))  # job id -> payloads (2xx)
    forged: int = 0  # requests whose signature did not verify
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, body: bytes, headers: dict[str, str]) -> int:
        try:
            payload = Webhook(SECRET).verify(body, headers)
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
