"""The app's error handlers: every error answers JSON ``{"detail": ...}``, never a traceback; the submission's
refusals (service/submission.py) get their answers here, so the routes that submit stay thin."""

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
from facegen.contract.model_store import ModelStoreUnavailable
from service import admission
from service.api.deps import ApiError
from service.config import Settings
from service.metrics import Metrics
from service.submission import InvalidRequest, Problem
from service.uploads import UploadError

log = logging.getLogger("service")
SUBMITTING_PATHS = ("/generate", "/edit")  # their 422s count as rejected jobs


def field_error(loc: tuple[str | int, ...], message: str, value: Any, where: str = "body") -> dict[str, Any]:
    """One entry of a 422's ``detail``, in FastAPI's format: ``loc`` within ``where`` (the body, a header)."""
    return {"type": "value_error", "loc": (where, *loc), "msg": message, "input": value}


def invalid_fields(problems: list[Problem]) -> RequestValidationError:
    """The 422 for request body fields refused by their ``(loc, message, input)``."""
    return RequestValidationError([field_error(*problem) for problem in problems])


def add_error_handlers(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = {"detail": exc.detail, **{k: v for k, v in exc.extra.items() if v is not None}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if getattr(request.scope.get("route"), "path", None) in SUBMITTING_PATHS:
            metrics.jobs_rejected.labels("invalid").inc()
        return _unprocessable(exc.errors())

    @app.exception_handler(InvalidRequest)
    async def refused_fields(request: Request, exc: InvalidRequest) -> JSONResponse:
        return await invalid(request, invalid_fields(exc.problems))

    _add_submission_handlers(app, settings)

    _add_outage_handlers(app, settings)

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


def _add_outage_handlers(app: FastAPI, settings: Settings) -> None:
    """503 with ``Retry-After`` when what a request needs does not answer: Redis, the artifact store, the model
    store."""

    def unavailable(detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(redis.RedisError)
    async def redis_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("Redis error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return unavailable("the job queue (Redis) is unavailable; retry later")

    @app.exception_handler(ArtifactStoreUnavailable)
    async def artifact_store_unavailable(request: Request, exc: ArtifactStoreUnavailable) -> JSONResponse:
        log.warning("artifact store error on %s %s: %s", request.method, request.url.path, exc)
        return unavailable("the artifact store is unreachable; retry later")

    @app.exception_handler(ModelStoreUnavailable)
    async def model_store_unavailable(request: Request, exc: ModelStoreUnavailable) -> JSONResponse:
        """A request needs the model store (a model name no live worker serves) and the store does not answer."""
        log.warning("model store error on %s %s: %s", request.method, request.url.path, exc)
        return unavailable("no live worker serves the model this request names, and the model store, which may "
                           "hold it, is unreachable; retry later")


def _add_submission_handlers(app: FastAPI, settings: Settings) -> None:
    """The answers to the other refusals of a submission (service/submission.py; it counts them)."""

    @app.exception_handler(admission.IdempotencyMismatch)
    async def idempotency_mismatch(request: Request, exc: admission.IdempotencyMismatch) -> JSONResponse:
        key = request.headers.get("Idempotency-Key")
        return _unprocessable([field_error(("Idempotency-Key",), str(exc), key, where="header")])

    @app.exception_handler(admission.Refused)
    async def refused(request: Request, exc: admission.Refused) -> JSONResponse:
        if exc.limit == "max_queued":
            detail = f"queue full (MAX_QUEUED={exc.allowed} jobs waiting); retry later"
        else:
            detail = (f"quota reached: {exc.limit} (at most {exc.allowed} for this API key; this request costs "
                      f"{exc.units} work units); retry later")
        return JSONResponse({"detail": detail, "limit": exc.limit, "allowed": exc.allowed}, status_code=429,
                            headers={"Retry-After": str(exc.retry_after_s or settings.retry_after_s)})

    @app.exception_handler(UploadError)
    async def upload_refused(request: Request, exc: UploadError) -> JSONResponse:
        headers = None if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse({"detail": f"image: {exc}"}, status_code=exc.status, headers=headers)


def _unprocessable(errors: Any) -> JSONResponse:
    # FastAPI's own handler would echo a NaN/Infinity input and then fail to render it (500).
    return JSONResponse({"detail": _json_safe(jsonable_encoder(errors))}, status_code=422)


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as strings (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value
