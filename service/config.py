"""API settings, read once from the environment (pydantic-settings).

Every field maps to the upper-case environment variable of the same name (``REDIS_URL``, ``MAX_QUEUED``, …);
an empty variable counts as unset. Routes get the settings through ``get_settings`` (cached), which
``create_app(settings)`` overrides, so tests can build apps with their own settings.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from worker import spec
from worker.connection import RedisSettings

_DAY_S = 24 * 3600


def _split_csv(value: Any) -> Any:
    """``"a, b,,c"`` -> ``("a", "b", "c")``; lists pass through."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Settings(RedisSettings):
    """The API's settings; the ``REDIS_*`` connection settings come from :class:`RedisSettings` (the worker
    shares them). ``REDIS_TIMEOUT_S`` bounds how long a request waits for Redis before answering 503."""

    model_config = SettingsConfigDict(env_ignore_empty=True, extra="ignore", frozen=True)

    # POST /generate answers 202 only once this many replicas hold the job (Redis WAIT, up to REDIS_TIMEOUT_S),
    # or all the primary has when it has fewer; 0 = don't wait. A primary without replicas is never waited on.
    redis_min_replicas_ack: Annotated[int, Field(ge=0, le=16)] = 1
    # Connections POST /generate may hold at once (per process); more concurrent requests wait for one.
    redis_max_connections: Annotated[int, Field(ge=1, le=10_000)] = 64
    queue_name: Annotated[str, Field(min_length=1)] = spec.DEFAULT_QUEUE
    # POST /generate answers 429 once the queue holds this many jobs.
    max_queued: Annotated[int, Field(ge=0)] = 1000
    # POST /generate checks requests against the model registry as read at most this many seconds ago
    # (0 = read it for every request); a request naming a model or attribute not in that view re-reads it.
    model_cache_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    # Value of the Retry-After header on 429 and 503 answers.
    retry_after_s: Annotated[int, Field(ge=1)] = 5
    # Comma-separated bearer tokens; none = open API.
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode, Field(repr=False)] = ()
    max_body_bytes: Annotated[int, Field(ge=256)] = 16 * 1024
    # Comma-separated origins allowed by CORS; none = no CORS headers at all.
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    # Finished jobs and their artifacts live this long (RQ result_ttl; the worker uses it for artifacts too).
    artifact_ttl: Annotated[int, Field(ge=60)] = spec.DEFAULT_ARTIFACT_TTL_S
    # Failed jobs (and their error line) live this long.
    failure_ttl: Annotated[int, Field(ge=60)] = spec.DEFAULT_ARTIFACT_TTL_S
    # A job id is remembered this long after submission, so an expired job answers 410 instead of 404.
    tombstone_ttl: Annotated[int, Field(ge=60)] = 7 * _DAY_S
    # An Idempotency-Key maps to its job this long.
    idempotency_ttl: Annotated[int, Field(ge=60)] = _DAY_S
    # RQ job timeout: the worker gives up on one job after this many seconds.
    job_timeout: Annotated[int, Field(ge=1)] = 900
    # A job that fails with a transient error, or whose worker dies, is run again up to this many times.
    job_retries: Annotated[int, Field(ge=0, le=10)] = 2
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    log_level: str = "info"

    _split_lists = field_validator("api_keys", "cors_origins", mode="before")(_split_csv)

    def api_key_values(self) -> tuple[bytes, ...]:
        return tuple(key.get_secret_value().encode() for key in self.api_keys)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
