"""Playground: a static page (service/static) at GET / that drives the API from the browser.

The page loads without an API key; its API calls send the key typed into it. Only the files listed here are
served, with a Content-Security-Policy that allows nothing outside this origin.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.api.deps import ApiError

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
FILES = {"app.js": "text/javascript", "edit.js": "text/javascript", "style.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["playground"], include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    if name not in FILES:
        raise ApiError(404, "not found")
    return FileResponse(STATIC_DIR / name, media_type=FILES[name] + "; charset=utf-8", headers=HEADERS)
