"""The OpenAPI document's description, tags, and exact integer bounds."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from facegen.contract import fields

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
    {"name": "webhooks", "description": "The signing secret of the caller's webhook deliveries."},
    {"name": "health", "description": "Liveness and readiness probes."},
    {"name": "metrics", "description": "Prometheus metrics."},
]


def exact_openapi_bounds(app: FastAPI) -> None:
    """FastAPI's OpenAPI model stores numeric bounds as floats (64.0, and 2**63-1 rounded up to 2**63): give
    integral bounds back as exact integers."""
    generate = app.openapi

    def fix(node: Any) -> None:
        if isinstance(node, dict):
            for key, item in node.items():
                if key in _BOUND_KEYS and isinstance(item, float) and item.is_integer():
                    node[key] = fields.MAX_SEED if item == float(fields.MAX_SEED) else int(item)
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
