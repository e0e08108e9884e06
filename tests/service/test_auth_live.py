"""API keys and connection bounds through the real ``python -m service``: the key is checked as soon as a request's
headers are in, before any of its body is read (an unauthenticated upload never reaches the disk); at most
MAX_CONNECTIONS connections are served at once; an open API (no keys) is served only on loopback unless
ALLOW_OPEN_API says otherwise."""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from scripts.processes import free_port, stop_process
from tests.service.conftest import REPO, LiveServer

KEY = "live-test-key"
BOUNDARY = "facegen-test-boundary"
DECLARED_BODY_BYTES = 3_000_000  # under POST /edit's body limit (4 MiB + 16 KiB), so only the key can refuse it
SENT_BODY_BYTES = 1_500_000  # past Starlette's 1 MiB in-memory spool: a parsed form would write a temp file
SOCKET_TIMEOUT_S = 30  # a server waiting for the body never answers: the test fails instead of hanging


@pytest.fixture(scope="module")
def server_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The API process's TMPDIR, where Starlette spools uploaded files."""
    return tmp_path_factory.mktemp("api-tmp")


@pytest.fixture(scope="module")
def keyed_server(redis_url: str, server_tmp: Path) -> Iterator[LiveServer]:
    live = LiveServer(redis_url, env={"API_KEYS": KEY, "TMPDIR": str(server_tmp), "REDIS_MIN_REPLICAS_ACK": "0"})
    yield live
    live.stop()


def upload_head(authorization: str | None) -> bytes:
    """The request line and headers of a POST /edit declaring a DECLARED_BODY_BYTES multipart body."""
    lines = ["POST /edit HTTP/1.1", "Host: facegen", f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
             f"Content-Length: {DECLARED_BODY_BYTES}"]
    if authorization is not None:
        lines.append(f"Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def body_start() -> bytes:
    """The first SENT_BODY_BYTES of the declared body: a file part that never ends."""
    part = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="face.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    return part + b"\x00" * (SENT_BODY_BYTES - len(part))


def files_under(folder: Path, pid: int) -> list[str]:
    """Entries of ``folder`` and the files process ``pid`` holds open there (unlinked temp files included)."""
    held = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed since the listing
            held.append(os.readlink(fd))
    return [entry.name for entry in folder.iterdir()] + [path for path in held if path.startswith(str(folder))]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {KEY}"])
def test_unauthenticated_upload_is_refused_from_its_headers_alone(keyed_server, server_tmp, authorization):
    with socket.create_connection(("127.0.0.1", keyed_server.port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(upload_head(authorization))  # and no byte of the body
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 401
        assert answer.getheader("WWW-Authenticate") == 'Bearer realm="facegen"'
        assert answer.read() == b'{"detail":"missing or invalid API key"}'
        try:  # the body arrives after the answer: the server must not parse (and spool) it
            sock.sendall(body_start())
        except OSError:
            pass  # the server may close the connection first
        assert files_under(server_tmp, keyed_server.process.pid) == []


def test_authenticated_upload_is_accepted(keyed_server, conn):
    face = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 150, 120)).save(face, format="PNG")
    answer = httpx.post(f"{keyed_server.url}/edit", data={"label": "smiling"},
                        files={"image": ("face.png", face.getvalue())},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=SOCKET_TIMEOUT_S)
    assert answer.status_code == 202, answer.text
    shown = httpx.get(f"{keyed_server.url}/jobs/{answer.json()['job_id']}",
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=SOCKET_TIMEOUT_S)
    assert shown.status_code == 200 and shown.json()["parameters"]["kind"] == "edit"


def get_healthz(sock: socket.socket) -> int:
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: facegen\r\n\r\n")
    answer = http.client.HTTPResponse(sock)
    answer.begin()
    answer.read()
    return answer.status


def test_the_connection_past_max_connections_gets_503(redis_url):
    limit = 3
    server = LiveServer(redis_url, env={"MAX_CONNECTIONS": str(limit)})
    try:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT_S) for _ in range(limit)]
        assert get_healthz(held[-1]) == 200  # MAX_CONNECTIONS connections open: each is served
        with socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT_S) as extra:
            assert get_healthz(extra) == 503
        for sock in held:
            sock.close()
    finally:
        server.stop()


def start_service(host: str, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "service", "--host", host, "--port", str(port),
                                "--log-level", "warning"], cwd=REPO, env={**os.environ, **env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, port


def test_an_open_api_on_a_public_address_refuses_to_start():
    process, _ = start_service("0.0.0.0", {"REDIS_URL": "redis://127.0.0.1:1/0"})  # refused before any Redis
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert err.count("\n") == 1 and "API_KEYS" in err and "ALLOW_OPEN_API" in err, err


@pytest.mark.parametrize(("host", "env"), [("0.0.0.0", {"ALLOW_OPEN_API": "true"}), ("0.0.0.0", {"API_KEYS": KEY}),
                                           ("127.0.0.1", {})])
def test_keys_an_explicit_open_api_or_loopback_start(redis_url, host, env):
    process, port = start_service(host, {"REDIS_URL": redis_url, **env})
    try:
        deadline = time.monotonic() + 90
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert process.poll() is None, process.communicate()[1]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        stop_process(process)


def test_a_renamed_setting_left_in_the_environment_refuses_to_start():
    process, _ = start_service("127.0.0.1", {"REDIS_URL": "redis://127.0.0.1:1/0", "QUOTA_QUEUED_IMAGES": "2048"})
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert err.count("\n") == 1 and "QUOTA_QUEUED_IMAGES" in err and "QUOTA_QUEUED_UNITS" in err, err
