"""Dependencies shared by the routers, as ``Annotated`` aliases."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any

import redis
from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from rq import Queue

from service import jobs
from service.config import Settings, get_settings
from service.metrics import Metrics

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


RedisDep = Annotated[redis.Redis, Depends(get_redis)]


def get_queue(conn: RedisDep, settings: SettingsDep) -> Queue:
    return jobs.make_queue(conn, settings)


QueueDep = Annotated[Queue, Depends(get_queue)]


def get_metrics(request: Request) -> Metrics:
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


def require_api_key(
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


def require_json(request: Request) -> None:
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
