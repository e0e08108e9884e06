"""Dependencies shared by the routers, as ``Annotated`` aliases, and the few helpers and response docs they share.

They are ``async def`` because none of them blocks: FastAPI runs a plain ``def`` dependency in its thread pool,
a hop that cost more CPU than POST /generate's own work. POST /generate is ``async`` too (asyncio Redis
client); the other routes use RQ's synchronous API and stay ``def``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import redis
import redis.asyncio
from fastapi import Depends, Header, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from rq import Queue
from rq.job import Job

from facegen.contract.artifacts import ArtifactStore
from service import job_ops
from service.config import Settings
from service.metrics import Metrics
from service.registry import LiveModels
from service.schemas import ErrorPublic, JobAccepted
from service.store_catalog import StoreCatalog
from service.submission import Submitted
from service.tenancy import Caller, KeyLabels


@dataclass(frozen=True)
class Services:
    """What the routes work with, built once by ``create_app`` and kept on ``app.state.services``."""

    settings: Settings  # as the app was created (``create_app``; by default ``get_settings()``, read once)
    redis: redis.Redis  # synchronous client, for RQ's API (the ``def`` routes, run in the thread pool)
    async_redis: redis.asyncio.Redis  # for POST /generate, which stays on the event loop
    queue: Queue  # the one RQ queue object: RQ caches the server version on it (one INFO per process)
    metrics: Metrics
    live_models: LiveModels
    key_labels: KeyLabels  # key id -> metric label (bounded cardinality)
    artifacts: ArtifactStore  # finished jobs' files (facegen/contract/artifacts.py: Redis or S3, per ARTIFACT_STORE)
    model_store: StoreCatalog | None  # the published versions and aliases (MODEL_STORE); None: no store


async def get_services(request: Request) -> Services:
    """One dependency for all of them: FastAPI's per-request cost grows with every dependency node (POST
    /generate spent half its non-Redis CPU time there), and with ``dependency_overrides`` it re-analyses every
    signature on every request, so tests build apps with their own settings instead of overriding."""
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer <key>`; required only when the server is started with API_KEYS.",
)

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"description": "API keys are enabled and the request has no valid `Authorization: Bearer` key."}
}

UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"description": "Redis is unreachable; retry after `Retry-After` seconds (body: `{detail}`)."}
}

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorPublic, "description": "No such job (or another API key's: each key sees only its own jobs; "
                                               "an admin key sees all)."}
}

GONE: dict[int | str, dict[str, Any]] = {
    410: {"model": ErrorPublic, "description": "The job (or its images) existed but has expired."}
}

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Any unique string (e.g. a UUID) chosen by the client; remembered for IDEMPOTENCY_TTL.",
    ),
]


async def require_api_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """The mark of a route that needs the bearer key when keys are configured; ``credentials`` declares the key
    in the OpenAPI schema. ``ApiKeyMiddleware`` (service/api/middleware.py) checks the key of every route that
    depends on this before any of the body is read, and leaves the :class:`Caller` (its key id, never the key)
    in ``request.state.caller``."""


def caller_of(request: Request) -> Caller:
    """The caller ``ApiKeyMiddleware`` identified (every router that serves jobs depends on ``require_api_key``)."""
    return request.state.caller


def root_path(request: Request) -> str:
    """The path the API is mounted under (``""`` at the root), without a trailing slash."""
    return request.scope.get("root_path", "").rstrip("/")


def fetch_job(conn: redis.Redis, job_id: str, caller: Caller) -> Job:
    """The caller's job ``job_id``; 404 when there is none (or it is another key's), 410 when it has expired."""
    try:
        return job_ops.fetch(conn, job_id, caller)
    except job_ops.JobNotFound:
        raise ApiError(404, "job not found") from None
    except job_ops.JobGone:
        raise ApiError(410, "job expired") from None


def accepted(response: Response, submitted: Submitted) -> JobAccepted:
    """The answer to a queued job (service/submission.py): its URL in ``Location``, ``Idempotent-Replayed`` when an
    earlier request with the same Idempotency-Key created it."""
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = submitted.job.links.self
    return submitted.job


async def require_json(request: Request) -> None:
    """415 unless the body is declared as JSON (runs before the body is validated)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, "send the request body as JSON (Content-Type: application/json)")


class ApiError(Exception):
    """An error answer ``{"detail": ..., **extra}`` (app.py renders it); for bodies richer than HTTPException's."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers
        self.extra = extra
