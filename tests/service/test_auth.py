"""Optional API keys: with keys set, every route but /healthz, /readyz, /metrics and the playground page refuses
requests without a valid `Authorization: Bearer` key; without keys, nothing asks for one."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from fastapi.routing import iter_route_contexts

from service import tenancy
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


@pytest.mark.parametrize(("method", "template"), [(m, p) for m, p in PROTECTED if m == "POST"])
def test_the_key_is_checked_before_the_body_is_read(make_settings, method, template):
    """The app itself, called as uvicorn calls it, with a body that fails the test if anything reads it; the
    401 still carries the CORS headers a browser needs to read it."""
    origin = "https://playground.example"
    app = create_app(make_settings(api_keys="key-one", cors_origins=origin))
    path = template.format(**PARAMS)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "state": {},
             "headers": [(b"host", b"facegen"), (b"origin", origin.encode()), (b"content-length", b"10000"),
                         (b"content-type", b"multipart/form-data; boundary=b")],
             "client": ("127.0.0.1", 50000), "server": ("facegen", 80)}
    sent = []

    async def receive():
        raise AssertionError("the body was read before the key was checked")

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401
    headers = dict(sent[0]["headers"])
    assert headers[b"www-authenticate"] == b'Bearer realm="facegen"'
    assert headers[b"access-control-allow-origin"] == origin.encode()
    assert json.loads(sent[1]["body"]) == {"detail": "missing or invalid API key"}


def test_a_non_ascii_key_is_compared_as_the_bytes_it_was_sent_as(make_client):
    key = "clé-ünïcode"
    client = make_client(api_keys=key)
    assert client.get("/models", headers={"Authorization": f"Bearer {key}".encode()}).status_code != 401
    assert client.get("/models", headers={"Authorization": "Bearer clé".encode()}).status_code == 401


@pytest.mark.parametrize(("host", "loopback"), [("localhost", True), ("127.0.0.1", True), ("127.8.9.10", True),
                                                ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("::", False),
                                                ("10.1.2.3", False), ("api.example.com", False)])
def test_only_loopback_addresses_may_serve_an_open_api(make_settings, host, loopback):
    assert (tenancy.open_api_problem(host, make_settings()) is None) is loopback
    assert tenancy.open_api_problem(host, make_settings(allow_open_api=True)) is None
    assert tenancy.open_api_problem(host, make_settings(admin_api_keys="admin")) is None
