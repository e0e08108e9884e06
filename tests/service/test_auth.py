"""Optional API keys: with keys set, every route but /healthz, /readyz, /metrics and the playground page refuses
requests without a valid `Authorization: Bearer` key; without keys, nothing asks for one."""

from __future__ import annotations

import uuid

import pytest
from fastapi.routing import iter_route_contexts

from service.app import create_app
from service.config import Settings

OPEN = {"/healthz", "/readyz", "/metrics", "/", "/static/{name}"}
PARAMS = {"job_id": str(uuid.uuid4()), "version": "latest", "name": "app.js", "index": 0}


def all_routes() -> list[tuple[str, str]]:
    """(method, path template) of every route the app serves, read from the app itself."""
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    routes = []
    for route in iter_route_contexts(app.routes):
        routes += [(method, route.path) for method in sorted(route.methods or ())]
    return routes


ROUTES = all_routes()
PROTECTED = [(m, p) for m, p in ROUTES if p not in OPEN]


def call(client, method: str, template: str, headers: dict[str, str] | None = None):
    path = template.format(**PARAMS)
    kwargs = {"json": {"label": "smiling"}} if method == "POST" else {}
    return client.request(method, path, headers=headers or {}, **kwargs)


def test_route_inventory_is_complete():
    paths = {p for _, p in ROUTES}
    assert {"/generate", "/jobs/{job_id}", "/jobs/{job_id}/result", "/jobs/{job_id}/animation", "/models",
            "/models/{version}", "/openapi.json", "/docs", "/redoc"} <= paths
    assert OPEN <= paths


@pytest.fixture
def keyed(make_client):
    return make_client(api_keys="key-one, key-two")


@pytest.mark.parametrize(("method", "template"), PROTECTED)
def test_protected_routes_refuse_without_a_valid_key(keyed, method, template):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic a2V5LW9uZQ=="},
                    {"Authorization": "Bearer "}, {"Authorization": "key-one"}):
        response = call(keyed, method, template, headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.json() == {"detail": "missing or invalid API key"}


@pytest.mark.parametrize(("method", "template"), PROTECTED)
@pytest.mark.parametrize("key", ["key-one", "key-two"])
def test_protected_routes_accept_each_key(keyed, method, template, key):
    response = call(keyed, method, template, {"Authorization": f"Bearer {key}"})
    assert response.status_code != 401, response.text


@pytest.mark.parametrize(("method", "template"), [(m, p) for m, p in ROUTES if p in OPEN])
def test_open_routes_need_no_key(keyed, method, template):
    assert call(keyed, method, template).status_code in (200, 503)  # /readyz: 503 without a worker


@pytest.mark.parametrize(("method", "template"), ROUTES)
def test_no_keys_configured_means_open(client, method, template):
    assert call(client, method, template).status_code != 401


def test_keys_scope_idempotency(keyed):
    def post(key):
        return keyed.post("/generate", json={"label": "smiling"},
                          headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "same"})

    one, two = post("key-one"), post("key-two")
    assert one.status_code == two.status_code == 202
    assert one.json()["job_id"] != two.json()["job_id"]  # one client's key never returns another's job
    assert post("key-one").json()["job_id"] == one.json()["job_id"]


def test_openapi_declares_bearer_auth(client):
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"]["scheme"].lower() == "bearer"
    assert schema["paths"]["/generate"]["post"]["security"] == [{"ApiKey": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
