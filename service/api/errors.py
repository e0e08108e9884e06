"""The app's error handlers: every error answers JSON ``{"detail": ...}``, never a traceback."""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException

from facegen.contract.artifacts import ArtifactStoreUnavailable
from service.api.deps import ApiError
from service.config import Settings
from service.metrics import Metrics

log = logging.getLogger("service")


def add_error_handlers(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = {"detail": exc.detail, **{k: v for k, v in exc.extra.items() if v is not None}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        route = request.scope.get("route")
        if getattr(route, "path", None) in ("/generate", "/edit") and not getattr(request.state, "rejection_counted", False):
            metrics.jobs_rejected.labels("invalid").inc()
        # FastAPI's own handler would echo a NaN/Infinity input and then fail to render it (500).
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(redis.RedisError)
    async def redis_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("Redis error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return JSONResponse(
            {"detail": "the job queue (Redis) is unavailable; retry later"},
            status_code=503,
            headers={"Retry-After": str(settings.retry_after_s)},
        )

    @app.exception_handler(ArtifactStoreUnavailable)
    async def artifact_store_unavailable(request: Request, exc: ArtifactStoreUnavailable) -> JSONResponse:
        log.warning("artifact store error on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(
            {"detail": "the artifact store is unreachable; retry later"},
            status_code=503,
            headers={"Retry-After": str(settings.retry_after_s)},
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body that is not UTF-8: a malformed body like any other, so 422.
            detail = [{"type": "json_invalid", "loc": ["body"], "msg": "body is not valid UTF-8 JSON", "input": None}]
            return JSONResponse({"detail": detail}, status_code=422)
        return await http_exception_handler(request, exc)

    @app.exception_handler(405)
    async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
        # Starlette lists only the first matching route's methods; GET and DELETE /jobs/{id} are two routes.
        allowed = sorted({
            method
            for route in iter_route_contexts(request.app.routes)
            if (regex := getattr(route, "path_regex", None)) is not None and regex.match(request.scope["path"])
            for method in (route.methods or ())
        })
        return JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": ", ".join(allowed)})

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value
