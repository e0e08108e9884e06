"""Dependencies shared by the routers, as ``Annotated`` aliases.

They are ``async def`` because none of them blocks: FastAPI runs a plain ``def`` dependency in its thread pool,
a hop that cost more CPU than POST /generate's own work. POST /generate is ``async`` too (asyncio Redis
client); the other routes use RQ's synchronous API and stay ``def``.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any

import redis
import redis.asyncio
from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from rq import Queue

from service.config import Settings
from service.metrics import Metrics


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with (``create_app``; by default ``get_settings()``, read once).

    Kept on ``app.state`` rather than swapped in with ``dependency_overrides``: any override makes FastAPI
    re-analyse every dependency's signature on every request (it was 70% of POST /generate's CPU time)."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


RedisDep = Annotated[redis.Redis, Depends(get_redis)]


async def get_async_redis(request: Request) -> redis.asyncio.Redis:
    return request.app.state.async_redis


AsyncRedisDep = Annotated[redis.asyncio.Redis, Depends(get_async_redis)]


async def get_queue(request: Request) -> Queue:
    """The app's one RQ queue object (RQ caches the server version on it: one INFO per process, not per job)."""
    return request.app.state.queue


QueueDep = Annotated[Queue, Depends(get_queue)]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


MetricsDep = Annotated[Metrics, Depends(get_metrics)]

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


async def require_api_key(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> str:
    """Checks the bearer key when API keys are configured; returns a stable, non-secret id of the caller."""
    keys = settings.api_key_values()
    if not keys:
        return "anonymous"
    token = credentials.credentials.encode() if credentials is not None else b""
    matched = False
    for key in keys:  # compare with every key, constant time each: no early exit that would leak which matched
        matched |= hmac.compare_digest(token, key)
    if not token or not matched:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key",
            headers={"WWW-Authenticate": 'Bearer realm="facegen"'},
        )
    return hashlib.sha256(token).hexdigest()[:32]


ClientDep = Annotated[str, Depends(require_api_key)]


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
