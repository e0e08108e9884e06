"""API documentation: /openapi.json, /docs (Swagger UI), /redoc. Behind the API key when keys are configured."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from service.api.deps import require_api_key, root_path

router = APIRouter(include_in_schema=False, dependencies=[Depends(require_api_key)])


@router.get("/openapi.json")
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
def swagger(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=root_path(request) + "/openapi.json", title=request.app.title + " - docs")


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=root_path(request) + "/openapi.json", title=request.app.title + " - ReDoc")
