"""API settings, read once from the environment (pydantic-settings).

Every field maps to the upper-case environment variable of the same name (``REDIS_URL``, ``MAX_QUEUED``, …);
an empty variable counts as unset. Routes get the settings through ``get_settings`` (cached), which
``create_app(settings)`` overrides, so tests can build apps with their own settings.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from facegen.contract import spec
from facegen.contract.artifacts import ArtifactSettings
from facegen.contract.connection import RedisSettings
from facegen.contract.model_store import ModelStoreSettings

_DAY_S = 24 * 3600
UPLOAD_FORM_OVERHEAD_BYTES = 16 * 1024
METRICS_LABEL_SECRET_MIN_CHARS = 16


def _split_csv(value: Any) -> Any:
    """``"a, b,,c"`` -> ``("a", "b", "c")``; lists pass through."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Quota(BaseModel):
    """Limits of one API key; in ``QUOTA_OVERRIDES`` a field left out (``None``) keeps the default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # jobs waiting in the key's queue (not yet taken by a worker)
    queued_jobs: Annotated[int | None, Field(ge=1)] = None
    # work units (facegen/contract/cost.py) of those jobs, summed
    queued_units: Annotated[int | None, Field(ge=1)] = None
    # work units accepted per minute, allowed in a burst (a token bucket refilled evenly over the minute)
    units_per_minute: Annotated[int | None, Field(ge=1)] = None

    def merged(self, override: Quota | None) -> Quota:
        """These limits with ``override``'s given fields in their place."""
        return self.model_copy(update=override.model_dump(exclude_none=True)) if override else self


class Settings(RedisSettings, ArtifactSettings, ModelStoreSettings):
    """The API's settings; the ``REDIS_*`` connection settings come from :class:`RedisSettings`, the artifact
    store's (``ARTIFACT_*``, ``S3_*``) from :class:`ArtifactSettings` (the worker shares both), the model store's
    (``MODEL_STORE``, read with the same S3 credentials as the artifact store: the API's read-only identity) from
    :class:`ModelStoreSettings`. ``REDIS_TIMEOUT_S`` bounds how long a request waits for Redis before answering
    503."""

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
    # GET /models, and POST /generate for a model name no live worker serves, reuse a listing of the model store
    # (its versions and aliases) read at most this many seconds ago, per process; 0 = list it for every request.
    model_store_cache_s: Annotated[float, Field(ge=0, le=300)] = 10.0
    # GET /readyz answers from a check (Redis ping and registry read, artifact store request) at most this many
    # seconds old, per process; 0 = check on every call.
    readyz_cache_s: Annotated[float, Field(ge=0, le=30)] = 1.0
    # Value of the Retry-After header on 429 and 503 answers.
    retry_after_s: Annotated[int, Field(ge=1)] = 5
    # Comma-separated bearer tokens; none (and no ADMIN_API_KEYS) = open API. Each key sees only its own jobs.
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode, Field(repr=False)] = ()
    # Comma-separated bearer tokens that may also read and cancel every key's jobs.
    admin_api_keys: Annotated[tuple[SecretStr, ...], NoDecode, Field(repr=False)] = ()
    # Let `python -m service` serve without API_KEYS/ADMIN_API_KEYS on an address other than loopback (127.0.0.0/8,
    # ::1, localhost); without it, it refuses to start there (exit code 2).
    allow_open_api: bool = False
    # A request's work units (facegen/contract/cost.py; a default POST /generate costs 100) at most; over it, 422.
    max_request_units: Annotated[int, Field(ge=1)] = 10_000
    # Per-key limits (API keys only; an open API has just MAX_QUEUED). Over one, POST /generate answers 429.
    # Jobs waiting, their work units summed, and work units accepted per minute (token bucket, burst = the figure).
    quota_queued_jobs: Annotated[int, Field(ge=1)] = 100
    quota_queued_units: Annotated[int, Field(ge=1)] = 20_000
    quota_units_per_minute: Annotated[int, Field(ge=1)] = 12_000
    # JSON object: key id (see service/tenancy.py) -> limits that differ from the defaults above, e.g.
    # {"3f2a…": {"queued_jobs": 500, "units_per_minute": 60000}}.
    quota_overrides: dict[str, Quota] = {}
    # Metrics label work by key while at most this many keys are configured, else by this many hashed buckets.
    metrics_key_labels: Annotated[int, Field(ge=1, le=1000)] = 50
    # The HMAC key of those labels (service/tenancy.py KeyLabels), at least 16 characters, the same on every API
    # replica; unset = derived from all of API_KEYS and ADMIN_API_KEYS (labels then change with the set of keys).
    metrics_label_secret: Annotated[SecretStr | None, Field(repr=False)] = None
    max_body_bytes: Annotated[int, Field(ge=256)] = 16 * 1024
    # POST /edit: the uploaded image's file size and pixel count (width x height, read from its header) at most;
    # the multipart body may exceed MAX_UPLOAD_BYTES by UPLOAD_FORM_OVERHEAD_BYTES (the other fields, boundaries).
    max_upload_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    max_upload_pixels: Annotated[int, Field(ge=1)] = 25_000_000
    # MiB one upload's decode may hold, estimated from its header (service/uploads.py decode_bytes); over it, 413.
    # A baseline JPEG holds a few MiB (DCT-scaled), a PNG 4 bytes a pixel (95 MiB at 25 M pixels), a progressive
    # JPEG 3 to 8, a WebP 16 (Pillow decodes both at full size): the default keeps one decode under 128 MiB.
    upload_decode_max_mib: Annotated[int, Field(ge=1)] = 120
    # Uploads one API process decodes at once (in its thread pool); one more waits for a slot up to
    # UPLOAD_DECODE_WAIT_S seconds, then answers 503 with Retry-After.
    upload_decode_concurrency: Annotated[int, Field(ge=1, le=64)] = 2
    upload_decode_wait_s: Annotated[float, Field(ge=0, le=60)] = 10.0
    # Comma-separated origins allowed by CORS; none = no CORS headers at all.
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
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
    # ----- webhooks (service/webhooks): POST /generate queues a delivery, `python -m service.webhooks` sends it
    # Standard Webhooks master secret, "whsec_" + base64; unset = webhooks off. Each API key's deliveries are signed
    # with a secret derived from it and the key id (shown to the key by GET /webhooks/secret), never with it.
    webhook_secret: Annotated[SecretStr | None, Field(repr=False)] = None
    # The master secret before a rotation, "whsec_" + base64: while set, every delivery is signed with the secrets
    # derived from both (two signatures), so receivers can switch to their new secret; unset = no rotation.
    webhook_secret_previous: Annotated[SecretStr | None, Field(repr=False)] = None
    # Let webhook URLs reach private, loopback and reserved addresses (link-local and cloud metadata stay refused).
    webhook_allow_private: bool = False
    # Comma-separated ports webhook URLs may name (a URL without a port uses 80 or 443).
    webhook_allowed_ports: Annotated[tuple[Annotated[int, Field(ge=1, le=65535)], ...], NoDecode,
                                     Field(min_length=1)] = (80, 443)
    # Delivery attempts of one API key's jobs in flight at once, across delivery processes (the open API's jobs
    # count as one key); an attempt over the limit is put back for a moment, so a slow receiver holds at most this
    # many senders and other keys' deliveries go on.
    webhook_tenant_concurrency: Annotated[int, Field(ge=1, le=1000)] = 2
    webhook_queue: Annotated[str, Field(min_length=1)] = "facegen-webhooks"
    # Seconds before each retry of a failed delivery (comma-separated): 6 attempts over about 10 minutes.
    webhook_retry_intervals: Annotated[tuple[Annotated[int, Field(ge=0)], ...], NoDecode] = (10, 30, 60, 120, 360)
    # One delivery attempt gives up after this many seconds in all: connect, send, and the answer's status and
    # headers (a receiver that drips its answer cannot stretch it); at most 64 KiB of the answer's body is read.
    webhook_timeout_s: Annotated[float, Field(gt=0, le=60)] = 10.0
    # The delivery process releases the deliveries of jobs that ended without doing so this often (and runs RQ's
    # maintenance of its queue).
    webhook_sweep_interval_s: Annotated[int, Field(ge=1)] = 30
    # Prometheus metrics of the delivery process (/metrics); 0 = none.
    webhook_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9101
    # ----- GET /jobs/{id}/events: a keep-alive comment after this many quiet seconds
    events_keepalive_s: Annotated[float, Field(gt=0, le=300)] = 15.0
    # An event stream ends after this long (clients go on with Last-Event-ID): rollouts drain, proxies see ends.
    events_max_s: Annotated[float, Field(gt=0, le=86_400)] = 600.0
    # Event streams one API process serves at once (each holds a Redis connection); more answer 503.
    events_max_streams: Annotated[int, Field(ge=1, le=100_000)] = 500
    # Event streams one API key holds open at once across all API replicas (Redis leases that lapse when their
    # process dies); more answer 429. The open API counts each client address as a key.
    events_max_streams_per_key: Annotated[int, Field(ge=1, le=100_000)] = 20
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    # Connections one API process holds open at once (uvicorn's limit_concurrency, counted per worker process):
    # a request on one more answers 503 at once (plain text, `Connection: close`). Keep it above
    # EVENTS_MAX_STREAMS, whose streams each hold a connection.
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    log_level: str = "info"

    _split_lists = field_validator("api_keys", "admin_api_keys", "cors_origins", "webhook_retry_intervals",
                                   mode="before")(_split_csv)

    @field_validator("webhook_secret")
    @classmethod
    def _secret_is_whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            signing_key(value)  # raises ValueError naming the expected form
        return value

    _split_ports = field_validator("webhook_allowed_ports", mode="before")(_split_csv)

    @field_validator("webhook_secret_previous")
    @classmethod
    def _previous_secret_is_whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                signing_key(value)
            except ValueError as exc:
                raise ValueError(str(exc).replace("WEBHOOK_SECRET", "WEBHOOK_SECRET_PREVIOUS", 1)) from None
        return value

    @field_validator("metrics_label_secret")
    @classmethod
    def _label_secret_is_long(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < METRICS_LABEL_SECRET_MIN_CHARS:
            # checked here, not by min_length, whose error would print the value
            raise ValueError(f"METRICS_LABEL_SECRET must be at least {METRICS_LABEL_SECRET_MIN_CHARS} characters "
                             "(e.g. $(openssl rand -base64 32))")
        return value

    @field_validator("quota_overrides")
    @classmethod
    def _overrides_name_key_ids(cls, value: dict[str, Quota]) -> dict[str, Quota]:
        for name in value:
            if not re.fullmatch(r"[0-9a-f]{32}", name):  # never a key itself: this setting is not a secret
                raise ValueError("QUOTA_OVERRIDES is keyed by key ids (32 hex digits of the key's sha256), not keys")
        return value

    def api_key_values(self) -> tuple[bytes, ...]:
        return tuple(key.get_secret_value().encode() for key in self.api_keys)

    def admin_key_values(self) -> tuple[bytes, ...]:
        return tuple(key.get_secret_value().encode() for key in self.admin_api_keys)

    def edit_body_limit(self) -> int:
        """The largest POST /edit body: the file at its limit plus the form around it."""
        return self.max_upload_bytes + UPLOAD_FORM_OVERHEAD_BYTES

    def default_quota(self) -> Quota:
        return Quota(queued_jobs=self.quota_queued_jobs, queued_units=self.quota_queued_units,
                     units_per_minute=self.quota_units_per_minute)


def signing_key(secret: SecretStr) -> bytes:
    """The HMAC key of a Standard Webhooks secret ``whsec_<base64>``."""
    text = secret.get_secret_value()
    try:
        if not text.startswith("whsec_"):
            raise ValueError
        key = base64.b64decode(text.removeprefix("whsec_"), validate=True)
    except ValueError:
        raise ValueError("WEBHOOK_SECRET must be 'whsec_' followed by base64 (e.g. whsec_$(openssl rand -base64 32))"
                         ) from None
    if len(key) < 16:
        raise ValueError("WEBHOOK_SECRET's key must be at least 16 bytes (24 base64 characters)")
    return key


# Settings that took a new name (and a new unit): an old name left in the environment would be silently ignored.
RENAMED_SETTINGS = {
    "QUOTA_QUEUED_IMAGES": "QUOTA_QUEUED_UNITS",
    "QUOTA_SUBMISSIONS_PER_MINUTE": "QUOTA_UNITS_PER_MINUTE",
}


def renamed_settings_problem(environ: Mapping[str, str]) -> str | None:
    """A one-line refusal naming the renamed settings ``environ`` still sets (non-empty), or ``None``."""
    stale = [f"{old} (now {new}, in work units)" for old, new in RENAMED_SETTINGS.items() if environ.get(old)]
    return f"settings renamed, set the new ones instead: {', '.join(stale)}" if stale else None


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
