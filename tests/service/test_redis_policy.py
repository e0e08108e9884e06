"""The Redis connection policy the API and the worker share (facegen.contract.connection): settings, what logs may show,
client options, and connection errors reaching the metrics."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio
from fastapi.testclient import TestClient
from pydantic import ValidationError

from facegen.contract import connection
from facegen.contract.connection import RedisSettings
from scripts.processes import free_port
from scripts.redisctl import AclUser, RedisServer
from service import admission, redis_clients
from service.app import create_app
from service.config import Settings

PASSWORD = "pa55:w/rd@x"


def test_sentinels_parse_from_a_comma_separated_list() -> None:
    settings = RedisSettings(redis_sentinels="10.0.0.1:26379, sentinel-b:26380,[::1]:26381",
                             redis_sentinel_master="facegen")
    assert settings.redis_sentinels == (("10.0.0.1", 26379), ("sentinel-b", 26380), ("::1", 26381))


@pytest.mark.parametrize("fields, message", [
    ({"redis_sentinels": "h:26379"}, "REDIS_SENTINEL_MASTER"),
    ({"redis_sentinels": "h"}, "host:port"),
    ({"redis_url": "rediss://h:6379/0", "redis_client_cert": "c.pem"}, "REDIS_CLIENT_KEY"),
    ({"redis_url": "redis://h:6379/0", "redis_ca_cert": "ca.pem"}, "rediss://"),
    ({"redis_url": "http://h:6379/0"}, "REDIS_URL"),
])
def test_inconsistent_settings_are_refused_naming_the_setting(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RedisSettings(**fields)


@pytest.mark.parametrize("url, shown", [
    (f"rediss://facegen:{PASSWORD.replace('/', '%2F').replace('@', '%40').replace(':', '%3A')}@h:6380/0",
     "rediss://facegen:***@h:6380/0"),
    ("redis://:secret@h:6379/2", "redis://:***@h:6379/2"),
    ("redis://h:6379/0?password=secret&ssl_ca_certs=/etc/ca.pem", "redis://h:6379/0?password=***&ssl_ca_certs=/etc/ca.pem"),
    ("redis://h:6379/0", "redis://h:6379/0"),
])
def test_logs_never_show_a_password(url: str, shown: str) -> None:
    assert connection.mask_url(url) == shown
    settings = RedisSettings(redis_url=url, redis_password=PASSWORD, redis_username="facegen")
    assert "secret" not in connection.describe(settings) and PASSWORD not in connection.describe(settings)
    assert PASSWORD not in repr(settings) and "secret" not in repr(settings)


def test_sentinel_description_names_the_primary_and_hides_the_password() -> None:
    settings = RedisSettings(redis_url="rediss://u:secret@ignored/3", redis_sentinels="s1:26379,s2:26379",
                             redis_sentinel_master="facegen")
    assert connection.describe(settings) == ("primary 'facegen' of Sentinels s1:26379,s2:26379 "
                                             "(rediss://u:***@ignored/3)")


def test_read_timeouts_outlast_the_blocking_commands_and_links_are_kept_alive(make_settings) -> None:
    settings = make_settings(redis_timeout_s=1.5)
    blocking = connection.connect(settings, blocking_s=30).connection_pool.connection_kwargs
    assert blocking["socket_timeout"] == 31.5 and blocking["socket_connect_timeout"] == 1.5
    assert blocking["socket_keepalive"] is True and blocking["socket_keepalive_options"]
    assert blocking["health_check_interval"] == connection.HEALTH_CHECK_INTERVAL_S
    # POST /generate's client may wait REDIS_TIMEOUT_S for a replica's WAIT: its reads wait that much longer.
    waiting = redis_clients.connect_async(settings).connection_pool.connection_kwargs
    assert waiting["socket_timeout"] == 3.0
    assert redis_clients.connect_async(make_settings(redis_timeout_s=1.5, redis_min_replicas_ack=0)) \
        .connection_pool.connection_kwargs["socket_timeout"] == 1.5


def test_credentials_from_settings_win_over_the_url() -> None:
    settings = RedisSettings(redis_url="redis://old:old@h:6379/4", redis_username="facegen",
                             redis_password=PASSWORD)
    kwargs = connection.connect(settings).connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["host"], kwargs["db"]) == ("facegen", PASSWORD, "h", 4)


def test_every_connection_error_is_reported_retries_included() -> None:
    settings = RedisSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.5)
    seen: list[Exception] = []
    with pytest.raises(redis.ConnectionError):
        connection.connect(settings, on_error=seen.append).ping()
    assert len(seen) == 1 + connection.RETRIES and all(isinstance(e, redis.ConnectionError) for e in seen)

    seen.clear()

    async def ping() -> None:
        client = connection.connect_async(settings, max_connections=2, on_error=seen.append)
        try:
            await client.ping()
        finally:
            await client.aclose()

    with pytest.raises(redis.ConnectionError):
        asyncio.run(ping())
    assert len(seen) == 1 + connection.RETRIES


def test_the_api_counts_redis_errors_in_its_metrics() -> None:
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.5))
    with TestClient(app) as client:
        assert client.post("/generate", json={"label": "smiling"}).status_code == 503
        metrics = client.get("/metrics").text
    counted = [line for line in metrics.splitlines() if line.startswith('facegen_api_redis_errors_total{error="')]
    assert counted and sum(float(line.rsplit(" ", 1)[1]) for line in counted) >= 1 + connection.RETRIES, metrics


def test_a_wrong_password_is_a_start_up_problem_an_absent_redis_is_not(redis_url: str) -> None:
    settings = RedisSettings(redis_url=redis_url, redis_username="nobody", redis_password=PASSWORD)
    problem = connection.credentials_problem(connection.connect(settings), settings)
    assert problem is not None and "refused the credentials" in problem and PASSWORD not in problem
    absent = RedisSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.5)
    assert connection.credentials_problem(connection.connect(absent), absent) is None


def test_a_user_who_may_not_run_role_or_wait_is_a_start_up_problem_unless_admission_does_not_wait() -> None:
    server = RedisServer(user=AclUser("narrow", "narrow-pw")).start()
    try:
        conn = redis_clients.connect(Settings(redis_url=server.url))
        conn.acl_setuser("narrow", enabled=True, passwords=["+narrow-pw"], keys=["*"], channels=["*"],
                         commands=["+@all", "-role"], reset=True)  # a narrower ACL than the server gave it
        problem = admission.replication_problem(conn, Settings(redis_url=server.url))
        assert problem is not None and "ROLE" in problem and "REDIS_MIN_REPLICAS_ACK=0" in problem
        assert admission.replication_problem(conn, Settings(redis_url=server.url, redis_min_replicas_ack=0)) is None
        conn.acl_setuser("narrow", commands=["+role"])
        assert admission.replication_problem(conn, Settings(redis_url=server.url)) is None
    finally:
        server.stop()


def test_tls_connections_of_the_asyncio_pool_share_one_ssl_context(tmp_path) -> None:
    # redis-py would build (and load the system's CA store into) one context per connection, on the event loop.
    settings = RedisSettings(redis_url="rediss://127.0.0.1:6380/0", redis_ca_cert=tmp_path / "ca.pem")
    pool = connection.connect_async(settings, max_connections=4).connection_pool
    first, second = pool.make_connection(), pool.make_connection()
    assert isinstance(first, redis.asyncio.SSLConnection) and first is not second
    assert first.ssl_context is second.ssl_context
