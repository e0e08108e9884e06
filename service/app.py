"""The application factory: ``create_app(settings)`` wires settings, Redis, metrics, routers and error handlers."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from facegen.contract.artifacts import open_store
from service import redis_clients, registry
from service.api.deps import Services
from service.api.errors import add_error_handlers
from service.api.main import ROUTERS
from service.api.middleware import ApiKeyMiddleware, BodyLimitMiddleware
from service.api.openapi import DESCRIPTION, TAGS, exact_openapi_bounds
from service.api.routes import events, health
from service.api.routes import webhooks as webhook_routes
from service.api.routes.edit import EDIT_PATH
from service.config import Settings, get_settings
from service.metrics import Metrics, MetricsMiddleware, QueueCollector
from service.store_catalog import StoreCatalog
from service.tenancy import ApiKeys, KeyLabels

log = logging.getLogger("service")


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app. ``settings`` default to the environment's (``get_settings()``)."""
    settings = settings or get_settings()
    metrics = Metrics()
    key_labels = KeyLabels(settings)
    conn = redis_clients.connect(settings, on_error=metrics.count_redis_error)
    async_conn = redis_clients.connect_async(settings, on_error=metrics.count_redis_error)
    event_streams = events.Streams.connect(settings, on_error=metrics.count_redis_error)
    metrics.registry.register(QueueCollector(conn, settings.queue_name, settings.webhook_queue, key_labels))
    queue = redis_clients.make_queue(conn, settings)
    model_store = StoreCatalog.open(settings, settings.model_store_cache_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:  # RQ asks the server's version once per queue: now, rather than from a burst of first requests
            queue.get_redis_server_version()
        except redis.RedisError:
            pass  # Redis is down: the first POST /generate asks
        yield
        conn.close()
        await async_conn.aclose()
        await event_streams.client.aclose()
        if model_store is not None:
            model_store.close()

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
        live_models=registry.LiveModels(async_conn, settings.model_cache_s, model_store),
        key_labels=key_labels,
        artifacts=open_store(settings, conn),
        model_store=model_store,
    )

    app.state.event_streams = event_streams
    app.state.readiness = health.ReadinessCache(settings.readyz_cache_s)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(webhook_routes.router)
    exact_openapi_bounds(app)
    add_error_handlers(app, settings, metrics)

    # innermost: CORS answers preflights and adds its headers to the 401s
    app.add_middleware(ApiKeyMiddleware, api_keys=ApiKeys(settings), routes=app.routes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Location", "Retry-After", "Idempotent-Replayed"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       path_limits={EDIT_PATH: settings.edit_body_limit()})
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: sees every answer, CORS's included
    return app


def create_served_app() -> FastAPI:
    """``create_app()`` for a process that serves nothing else (``python -m service``, each uvicorn worker).

    Collects once, then freezes every object alive after start-up (modules, routes, schemas: some 70,000 that
    each full collection would walk, ~15 ms) so the collector no longer visits them, and lets the youngest
    generation grow to 10,000 objects between collections instead of 700: under load those collections were the
    slow tail of POST /generate (figures in BENCHMARKS.md)."""
    app = create_app()
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000)
    return app
