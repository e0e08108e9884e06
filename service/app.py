"""The application factory: ``create_app(settings)`` wires settings, Redis, metrics, routers and error handlers."""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.routing import iter_route_contexts
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import jobs
from service.api.deps import ApiError, Services
from service.api.routes import docs, health, models, playground
from service.api.routes import jobs as job_routes
from service.api.routes import metrics as metrics_routes
from service.config import Settings, get_settings
from service.metrics import Metrics, MetricsMiddleware, QueueCollector
from worker import spec

log = logging.getLogger("service")

DESCRIPTION = """\
Attribute-conditioned face generation with a latent diffusion model.

`POST /generate` queues a job and answers 202 at once; poll `GET /jobs/{id}` (status, progress), then fetch
`GET /jobs/{id}/result` (PNG grid) and `GET /jobs/{id}/animation` (GIF of the denoising trajectory).
Labels, attributes and models come from the live workers: see `GET /models`.

Errors are JSON `{"detail": ...}`; validation errors (422) list the failing fields in `detail[].loc`.
When the server has API keys, every route except `/healthz`, `/readyz`, `/metrics` and the playground page
needs `Authorization: Bearer <key>`.
"""

TAGS = [
    {"name": "jobs", "description": "Queue, follow, cancel generation jobs; fetch their images."},
    {"name": "models", "description": "Model versions the live workers serve."},
    {"name": "health", "description": "Liveness and readiness probes."},
    {"name": "metrics", "description": "Prometheus metrics."},
]


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app. ``settings`` default to the environment's (``get_settings()``)."""
    settings = settings or get_settings()
    metrics = Metrics()
    conn = jobs.connect(settings, on_error=metrics.count_redis_error)
    async_conn = jobs.connect_async(settings, on_error=metrics.count_redis_error)
    metrics.registry.register(QueueCollector(conn, settings.queue_name))
    queue = jobs.make_queue(conn, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:  # RQ asks the server's version once per queue: now, rather than from a burst of first requests
            queue.get_redis_server_version()
        except redis.RedisError:
            pass  # Redis is down: the first POST /generate asks
        yield
        conn.close()
        await async_conn.aclose()

    app = FastAPI(
        title="facegen",
        version="0.1.0",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by routes/docs.py, behind the API key when keys are set
    )
    app.state.services = Services(
        settings=settings,
        redis=conn,
        async_redis=async_conn,
        queue=queue,
        metrics=metrics,
        live_models=jobs.LiveModels(async_conn, settings.model_cache_s),
    )

    for module in (job_routes, models, health, metrics_routes, playground, docs):
        app.include_router(module.router)
    _exact_openapi_bounds(app)
    _add_error_handlers(app, settings, metrics)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Location", "Retry-After", "Idempotent-Replayed"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: sees every answer, CORS's included
    return app


def create_served_app() -> FastAPI:
    """``create_app()`` for a process that serves nothing else (``python -m service``, each uvicorn worker).

    Collects once, then freezes every object alive after start-up (modules, routes, schemas: some 70,000 that
    each full collection would walk, ~15 ms) so the collector no longer visits them, and lets the youngest
    generation grow to 10,000 objects between collections instead of 700. Under load those collections were the
    slow tail of POST /generate: p99 at 64 clients went from ~60 ms to ~38 ms (BENCHMARKS.md)."""
    app = create_app()
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000)
    return app


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes``: at once from Content-Length, else while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"request body too large (limit {self.max_bytes} bytes)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = self._too_large()
            await JSONResponse({"detail": error.detail}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()  # inside a route: rendered as JSON by FastAPI's handler
            return message

        await self.app(scope, limited_receive, send)


def _exact_openapi_bounds(app: FastAPI) -> None:
    """FastAPI's OpenAPI model stores numeric bounds as floats (64.0, and 2**63-1 rounded up to 2**63): give
    integral bounds back as exact integers."""
    generate = app.openapi

    def fix(node: Any) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                if key in _BOUND_KEYS and isinstance(item, float) and item.is_integer():
                    node[key] = spec.MAX_SEED if item == float(spec.MAX_SEED) else int(item)
                else:
                    fix(item)
        elif isinstance(node, list):
            for item in node:
                fix(item)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            fix(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


_BOUND_KEYS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}


def _add_error_handlers(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = {"detail": exc.detail, **{k: v for k, v in exc.extra.items() if v is not None}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        route = request.scope.get("route")
        if getattr(route, "path", None) == "/generate" and not getattr(request.state, "rejection_counted", False):
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
