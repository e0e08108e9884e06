"""ASGI middleware of the app (besides the metrics middleware, which lives with the metrics)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from fastapi import HTTPException
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.datastructures import Headers
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import require_api_key
from service.tenancy import OPEN_CALLER, ApiKeys


def route_path(scope: Scope) -> str:
    """The request's path below the app's mount point (``root_path``), as the router matches it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes`` (or over ``path_limits[path]`` on those paths, e.g. an upload
    route): at once from Content-Length, else while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}

    def _too_large(self, limit: int) -> HTTPException:
        return HTTPException(413, f"request body too large (limit {limit} bytes)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(route_path(scope), self.max_bytes)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            error = self._too_large(limit)
            await JSONResponse({"detail": error.detail}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._too_large(limit)  # inside a route: rendered as JSON by FastAPI's handler
            return message

        await self.app(scope, limited_receive, send)


UNAUTHORIZED_BODY = {"detail": "missing or invalid API key"}
UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="facegen"'}


@dataclass(frozen=True)
class _RoutePattern:
    """What the router matches a request against: ``path_regex`` on the path, one of ``methods`` (any if empty)."""

    path_regex: re.Pattern[str]
    methods: frozenset[str]
    needs_key: bool  # the route depends on ``require_api_key``

    def matches(self, method: str, path: str) -> bool:
        return (not self.methods or method in self.methods) and self.path_regex.match(path) is not None


def _calls(dependant: Dependant) -> Iterator[object]:
    """Every dependency callable of ``dependant``, sub-dependencies included."""
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


def route_patterns(routes: Iterable[BaseRoute]) -> list[_RoutePattern]:
    """The app's HTTP routes in the router's order, each marked with whether it needs the API key."""
    patterns = []
    for route in iter_route_contexts(list(routes)):
        regex, dependant = getattr(route, "path_regex", None), getattr(route, "dependant", None)
        if regex is not None:
            needs_key = dependant is not None and require_api_key in set(_calls(dependant))
            patterns.append(_RoutePattern(regex, frozenset(route.methods or ()), needs_key))
    return patterns


class ApiKeyMiddleware:
    """The API-key check of every route that depends on ``require_api_key`` (service/api/deps.py), made before
    the route reads any of the body (FastAPI parses a form, spilling its files to disk, before it runs a
    route's dependencies): 401 ``{"detail"}`` with ``WWW-Authenticate`` when keys are configured and the request
    carries none of them. Leaves the :class:`~service.tenancy.Caller` in ``scope["state"]["caller"]``
    (``request.state.caller``), where the routes read it. Routes without the dependency (health, metrics, the
    playground) stay open; a request no route matches goes on to the router's 404/405 (which read no body).

    Starlette builds its middleware at the app's first request, when ``routes`` (the app's) are all there."""

    def __init__(self, app: ASGIApp, api_keys: ApiKeys, routes: Iterable[BaseRoute]) -> None:
        self.app = app
        self.api_keys = api_keys
        self.patterns = route_patterns(routes) if api_keys.configured else []

    def _needs_key(self, scope: Scope) -> bool:
        method, path = scope["method"], route_path(scope)
        return next((pattern.needs_key for pattern in self.patterns if pattern.matches(method, path)), False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.api_keys.configured:
            scope.setdefault("state", {})["caller"] = OPEN_CALLER
        elif self._needs_key(scope):
            authorization = next((value for name, value in scope["headers"] if name == b"authorization"), None)
            caller = self.api_keys.caller(authorization)
            if caller is None:
                response = JSONResponse(UNAUTHORIZED_BODY, status_code=401, headers=UNAUTHORIZED_HEADERS)
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)
