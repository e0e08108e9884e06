"""How every facegen process reaches Redis: one policy for the API and the worker.

- **Read timeouts outlast blocking commands.** A client's read timeout is ``REDIS_TIMEOUT_S`` plus the longest
  blocking command its process issues (the worker's dequeue wait, the API's ``WAIT`` for a replica), so an idle
  worker's dequeue never ends in "Timeout reading from socket".
- **Dead links are noticed.** TCP keep-alive probes a silent peer; a connection idle for longer than
  ``HEALTH_CHECK_INTERVAL_S`` is PINGed before it is used again (a load balancer or a failover may have cut it).
- **Reconnects stay short.** Between attempts a client waits a jittered backoff of at most half a second. The API
  retries a failed command twice, then answers 503; the worker keeps retrying for ``OUTAGE_PATIENCE_S``, long
  enough to ride out a restart or a failover, and its dequeue loop waits at most ``RECONNECT_WAIT_MAX_S`` between
  attempts. Every connection error is reported to ``on_error`` (the processes count them in their metrics).
- **TLS and ACLs.** ``rediss://`` URLs, ``REDIS_CA_CERT``, ``REDIS_CLIENT_CERT``/``REDIS_CLIENT_KEY``, and an ACL
  user and password from the URL or ``REDIS_USERNAME``/``REDIS_PASSWORD`` (these win). Passwords never reach a
  log line: use :func:`describe`.
- **Sentinel.** With ``REDIS_SENTINELS=host:port,...`` and ``REDIS_SENTINEL_MASTER`` the clients ask the Sentinels
  for the primary on every new connection and follow a failover; ``REDIS_URL`` then gives only the scheme
  (``rediss`` = TLS, to the Sentinels too), the credentials and the database.
- **No eviction.** A Redis that evicts keys when full loses accepted jobs without a trace; the processes refuse to
  start on one (``INFO memory``: ``maxmemory`` set and a ``maxmemory-policy`` other than ``noeviction``) unless
  ``REDIS_ALLOW_EVICTION`` is on.

Imports neither torch nor FastAPI: the API process uses it as it uses :mod:`facegen.contract.spec`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.connection
import redis.retry
import redis.sentinel
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode
from redis.backoff import ExponentialWithJitterBackoff

KEEPALIVE_IDLE_S = 15  # a silent peer gets its first keep-alive probe after this long,
KEEPALIVE_INTERVAL_S = 5  # then one every 5 s,
KEEPALIVE_PROBES = 3  # and the connection is dropped after 3 unanswered ones: a dead link is noticed in 30 s
HEALTH_CHECK_INTERVAL_S = 15  # a connection idle longer than this is PINGed before it carries a command
RETRIES = 2  # retries of a command that hit a connection error, after a jittered backoff of:
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 0.5
RECONNECT_WAIT_MAX_S = 2.0  # the worker's dequeue loop retries at least this often (RQ's default grows to 60 s)
# The worker retries a failing command this long instead of twice: through a Redis restart or a Sentinel failover
# it then finishes the job it holds instead of failing and exiting. The API keeps to RETRIES and answers 503.
OUTAGE_PATIENCE_S = 30.0

log = logging.getLogger(__name__)

OnError = Callable[[Exception], None]
# ``REDIS_URL`` query parameters whose values are secrets (redis-py passes unknown ones on to the connection).
_SECRET_PARAMS = {"password"}


class RedisSettings(BaseSettings):
    """The ``REDIS_*`` settings, shared by the API's and the worker's settings classes (pydantic-settings)."""

    # redis://[user:password@]host:port/db, rediss:// for TLS, unix:///path/to/socket; with Sentinels, only the
    # scheme, the credentials and the database count.
    redis_url: Annotated[str, Field(repr=False)] = "redis://127.0.0.1:6379/0"
    # ACL user and password; override those of REDIS_URL.
    redis_username: str | None = None
    redis_password: Annotated[SecretStr | None, Field(repr=False)] = None
    # PEM files for TLS: the CA that signed the server's certificate (default: the system's), and an optional
    # client certificate and key for servers that verify clients.
    redis_ca_cert: Path | None = None
    redis_client_cert: Path | None = None
    redis_client_key: Path | None = None
    # host:port of each Sentinel, comma-separated; with them, REDIS_SENTINEL_MASTER names the monitored primary.
    redis_sentinels: Annotated[tuple[tuple[str, int], ...], NoDecode] = ()
    redis_sentinel_master: str | None = None
    # Seconds to wait for Redis (connect, and per command on top of any blocking wait) before giving up.
    redis_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # Start even when Redis may evict keys (maxmemory with a maxmemory-policy other than noeviction), with a
    # warning: for a managed Redis whose policy cannot be changed. Evicted keys are jobs, results and artifacts lost.
    redis_allow_eviction: bool = False

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _parse_sentinels(cls, value: Any) -> Any:
        """``"h1:26379, h2:26379"`` -> ``(("h1", 26379), ("h2", 26379))``."""
        if not isinstance(value, str):
            return value
        pairs = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port, got {item!r}")
            pairs.append((host.strip("[]"), int(port)))
        return tuple(pairs)

    @model_validator(mode="after")
    def _consistent(self) -> RedisSettings:
        scheme = urlsplit(self.redis_url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("REDIS_URL must start with redis://, rediss:// (TLS) or unix://")
        if (self.redis_client_cert is None) != (self.redis_client_key is None):
            raise ValueError("set both REDIS_CLIENT_CERT and REDIS_CLIENT_KEY, or neither")
        tls_files = (self.redis_ca_cert, self.redis_client_cert)
        if any(path is not None for path in tls_files) and scheme != "rediss":
            raise ValueError("REDIS_CA_CERT / REDIS_CLIENT_CERT need a rediss:// REDIS_URL (TLS)")
        if self.redis_sentinels and not self.redis_sentinel_master:
            raise ValueError("REDIS_SENTINELS needs REDIS_SENTINEL_MASTER (the name the Sentinels monitor)")
        return self

    @property
    def tls(self) -> bool:
        return urlsplit(self.redis_url).scheme == "rediss"


# ----- what the logs may show ---------------------------------------------------------------------------------
def mask_url(url: str) -> str:
    """``url`` with its password (in the user part or a ``password=`` parameter) replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    query = urlencode([(k, "***" if k in _SECRET_PARAMS else v) for k, v in parse_qsl(parts.query)], safe="/*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def describe(settings: RedisSettings) -> str:
    """Where the clients connect, for log lines and errors: never a password."""
    where = mask_url(settings.redis_url)
    if settings.redis_sentinels:
        sentinels = ",".join(f"{host}:{port}" for host, port in settings.redis_sentinels)
        where = f"primary {settings.redis_sentinel_master!r} of Sentinels {sentinels} ({where})"
    return f"{where} as user {settings.redis_username!r}" if settings.redis_username else where


# ----- client options -----------------------------------------------------------------------------------------
def read_timeout_s(settings: RedisSettings, blocking_s: float = 0.0) -> float:
    """A client's read timeout: the command timeout on top of the longest blocking command it issues."""
    return settings.redis_timeout_s + blocking_s


def _keepalive_options() -> dict[int, int]:
    wanted = {"TCP_KEEPIDLE": KEEPALIVE_IDLE_S, "TCP_KEEPINTVL": KEEPALIVE_INTERVAL_S, "TCP_KEEPCNT": KEEPALIVE_PROBES}
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=BACKOFF_BASE_S, cap=BACKOFF_CAP_S)


class _RetryPolicy:
    """What both retry classes below add to redis-py's: every connection error goes to ``on_error``; a refused
    password is never retried (no retry fixes it); with ``patience_s`` the retries go on until that many seconds
    have passed since the first failure, else they stop after ``RETRIES``."""

    def __init__(self, on_error: OnError | None, patience_s: float):
        super().__init__(_backoff(), -1 if patience_s else RETRIES)  # -1: until the deadline below
        self.on_error = on_error
        self.patience_s = patience_s

    def __deepcopy__(self, memo: dict) -> _RetryPolicy:
        return type(self)(self.on_error, self.patience_s)  # redis-py copies it per connection: share the reporter

    def _report(self, error: Exception, deadline: float) -> None:
        """Called after redis-py's own failure handler (which drops the broken connection); raising gives up."""
        if self.on_error is not None:
            self.on_error(error)
        if isinstance(error, redis.AuthenticationError) or (self.patience_s and time.monotonic() > deadline):
            raise error


class _CountingRetry(_RetryPolicy, redis.retry.Retry):
    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):  # noqa: ANN001, ANN201
        deadline = time.monotonic() + self.patience_s

        def counted(error: Exception, *failures: int) -> Any:
            result = fail(error, *failures)
            self._report(error, deadline)
            return result

        return super().call_with_retry(do, counted, is_retryable, with_failure_count)


class _AsyncCountingRetry(_RetryPolicy, redis.asyncio.retry.Retry):
    async def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):  # noqa: ANN001, ANN201
        deadline = time.monotonic() + self.patience_s

        async def counted(error: Exception, *failures: int) -> Any:
            result = await fail(error, *failures)
            self._report(error, deadline)
            return result

        return await super().call_with_retry(do, counted, is_retryable, with_failure_count)


def _socket_options(settings: RedisSettings, read_timeout: float, unix: bool = False) -> dict[str, Any]:
    options: dict[str, Any] = {"socket_timeout": read_timeout, "socket_connect_timeout": settings.redis_timeout_s,
                               "health_check_interval": HEALTH_CHECK_INTERVAL_S}
    if not unix:  # keep-alive is a TCP option
        options.update(socket_keepalive=True, socket_keepalive_options=_keepalive_options())
    return options


def _tls_options(settings: RedisSettings) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if settings.redis_ca_cert is not None:
        options["ssl_ca_certs"] = str(settings.redis_ca_cert)
    if settings.redis_client_cert is not None and settings.redis_client_key is not None:
        options["ssl_certfile"] = str(settings.redis_client_cert)
        options["ssl_keyfile"] = str(settings.redis_client_key)
    return options


def _credentials(settings: RedisSettings) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if settings.redis_username:
        options["username"] = settings.redis_username
    if settings.redis_password is not None and settings.redis_password.get_secret_value():
        options["password"] = settings.redis_password.get_secret_value()
    return options


def _connection_kwargs(settings: RedisSettings, blocking_s: float = 0.0, asyncio: bool = False) -> dict[str, Any]:
    """Keyword arguments for a redis-py connection pool of this policy (the retry object comes separately).

    Without Sentinels they include the URL's host and port (or socket path) and the connection class, from
    redis-py's own URL parser, which also passes on its URL parameters (``?ssl_ca_certs=...``); with Sentinels,
    ``ssl=True`` for TLS instead (the Sentinel pool picks the connection class and the primary's address)."""
    parse_url = redis.asyncio.connection.parse_url if asyncio else redis.connection.parse_url
    url_options = dict(parse_url(settings.redis_url))
    unix = "path" in url_options
    options = {**url_options, **_socket_options(settings, read_timeout_s(settings, blocking_s), unix),
               **_tls_options(settings), **_credentials(settings)}
    if settings.redis_sentinels:
        for key in ("host", "port", "connection_class"):
            options.pop(key, None)
        if settings.tls:
            options["ssl"] = True
    return options


def _sentinel_kwargs(settings: RedisSettings) -> dict[str, Any]:
    """How to reach the Sentinels themselves: the same timeouts, keep-alive and TLS, no ACL user (Sentinels
    keep their own users)."""
    options = _socket_options(settings, settings.redis_timeout_s)
    if settings.tls:
        options.update(ssl=True, **_tls_options(settings))
    return options


# ----- clients ------------------------------------------------------------------------------------------------
def connect(settings: RedisSettings, blocking_s: float = 0.0, on_error: OnError | None = None,
            patience_s: float = 0.0) -> redis.Redis:
    """A pooled synchronous client. ``blocking_s``: the longest blocking command the caller issues (the worker's
    dequeue wait); ``on_error`` is called with every connection error, retried or not; ``patience_s``: retry a
    failing command for this long (0: ``RETRIES`` times)."""
    options = {**_connection_kwargs(settings, blocking_s), "retry": _CountingRetry(on_error, patience_s)}
    if settings.redis_sentinels:
        sentinel = redis.sentinel.Sentinel(settings.redis_sentinels, sentinel_kwargs=_sentinel_kwargs(settings))
        return sentinel.master_for(settings.redis_sentinel_master, **options)
    return redis.Redis.from_pool(redis.ConnectionPool(**options))


class _BlockingSentinelPool(redis.asyncio.sentinel.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool):
    """Sentinel discovery with the blocking pool's bound: a request beyond ``max_connections`` waits for a free
    connection (up to ``timeout``) instead of failing."""


def connect_async(settings: RedisSettings, max_connections: int, blocking_s: float = 0.0,
                  on_error: OnError | None = None) -> redis.asyncio.Redis:
    """The asyncio twin of :func:`connect`, with at most ``max_connections`` connections; a caller beyond them
    waits for one up to ``REDIS_TIMEOUT_S``. The client owns its pool (``aclose()`` closes both)."""
    options = {**_connection_kwargs(settings, blocking_s, asyncio=True), "retry": _AsyncCountingRetry(on_error, 0.0),
               "max_connections": max_connections, "timeout": settings.redis_timeout_s}
    if settings.redis_sentinels:
        sentinel = redis.asyncio.sentinel.Sentinel(settings.redis_sentinels,
                                                   sentinel_kwargs=_sentinel_kwargs(settings))
        client = sentinel.master_for(settings.redis_sentinel_master, connection_pool_class=_BlockingSentinelPool,
                                     **options)
    else:
        client = redis.asyncio.Redis.from_pool(redis.asyncio.BlockingConnectionPool(**options))
    pool = client.connection_pool
    if issubclass(pool.connection_class, redis.asyncio.SSLConnection):
        pool.connection_class = _sharing_ssl_context(pool.connection_class)
    return client


def _sharing_ssl_context(base: type[redis.asyncio.SSLConnection]) -> type[redis.asyncio.SSLConnection]:
    """``base`` whose connections (all made by one pool, with the same options) share one SSL context. redis-py
    builds a context per connection, loading the system's CA store each time (~35 ms of CPU, on the event loop):
    a burst that opened the pool's 64 connections stalled the API for seconds and requests timed out waiting."""
    shared: dict[str, Any] = {}

    class SharedContextConnection(base):  # type: ignore[valid-type, misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.ssl_context = shared.setdefault("context", self.ssl_context)

    SharedContextConnection.__name__ = f"SharedContext{base.__name__}"
    return SharedContextConnection


# ----- start-up -----------------------------------------------------------------------------------------------
def credentials_problem(client: redis.Redis, settings: RedisSettings) -> str | None:
    """A one-line reason when Redis refuses this process's credentials or TLS set-up, else ``None``.

    Both are configuration errors that no retry fixes, so the processes refuse to start on them. A Redis that is
    merely unreachable is not: the API answers 503 and the worker waits until it is back."""
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        return f"Redis at {describe(settings)} refused the credentials: {exc}"
    except redis.ConnectionError as exc:
        if _caused_by(exc, ssl.SSLError):
            return f"TLS to Redis at {describe(settings)} failed: {exc}"
    except redis.RedisError:
        pass
    return None


def eviction_problem(client: redis.Redis, settings: RedisSettings) -> str | None:
    """A one-line reason when Redis may evict keys and ``REDIS_ALLOW_EVICTION`` is off, else ``None`` (with a
    logged warning when it is on).

    Redis evicts only with ``maxmemory`` set (bytes, 0 = no limit) and a ``maxmemory-policy`` other than
    ``noeviction``: ``allkeys-*`` drops queued jobs and the queue itself, ``volatile-*`` the keys with a TTL (finished
    jobs, artifacts, the workers' model entries, idempotency keys). Read from ``INFO memory``, which managed services
    that forbid ``CONFIG`` answer; a Redis that is unreachable or refuses ``INFO`` gives ``None``."""
    try:
        memory = client.info("memory")
    except redis.RedisError:
        return None
    policy = memory.get("maxmemory_policy", "noeviction")
    if not memory.get("maxmemory") or policy == "noeviction":
        return None
    problem = (f"Redis at {describe(settings)} evicts keys when it reaches maxmemory (maxmemory-policy {policy}), "
               "losing queued jobs and results without a trace")
    if settings.redis_allow_eviction:
        log.warning("%s; running anyway (REDIS_ALLOW_EVICTION)", problem)
        return None
    return f"{problem}: set its maxmemory-policy to noeviction, or REDIS_ALLOW_EVICTION=true to run anyway"


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
