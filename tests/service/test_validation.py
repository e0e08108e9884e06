"""POST /generate input checks: every field's bounds and types answer 422 naming the field; never a 500."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from facegen.contract import fields, spec
from service.app import create_app

OK = {"label": "smiling"}

# (field, body) pairs: each body is invalid only in `field`.
INVALID = [
    ("label", {"label": ""}),
    ("label", {"label": "x" * 65}),
    ("label", {"label": 5}),
    ("label", {"label": ["smiling"]}),
    ("label", {"label": "happy"}),
    ("label", {"label": "not_"}),
    ("label", {"label": "smíling"}),  # unicode look-alike
    ("label", {"label": "😀"}),
    ("label", {"label": "smiling\u0000"}),
    ("label", {"label": "\u202esmiling"}),  # right-to-left override
    ("label", {}),  # neither label nor attributes
    ("label", {"label": "smiling", "attributes": {"Smiling": True}}),  # both
    ("attributes", {"attributes": {}}),
    ("attributes", {"attributes": {"Smiling": "yes"}}),
    ("attributes", {"attributes": {"Smiling": 1}}),
    ("attributes", {"attributes": ["Smiling"]}),
    ("attributes", {"attributes": {"Wearing_Hat": True}}),
    ("attributes", {"attributes": {"Smílíng": True}}),
    ("count", {**OK, "count": 0}),
    ("count", {**OK, "count": fields.MAX_COUNT + 1}),
    ("count", {**OK, "count": -3}),
    ("count", {**OK, "count": 10**30}),
    ("count", {**OK, "count": "4"}),
    ("count", {**OK, "count": 4.5}),
    ("count", {**OK, "count": True}),
    ("count", {**OK, "count": None}),
    ("seed", {**OK, "seed": -1}),
    ("seed", {**OK, "seed": fields.MAX_SEED + 1}),
    ("seed", {**OK, "seed": 10**400}),
    ("seed", {**OK, "seed": "1"}),
    ("seed", {**OK, "seed": 1.5}),
    ("steps", {**OK, "steps": 0}),
    ("steps", {**OK, "steps": fields.MAX_STEPS + 1}),
    ("steps", {**OK, "steps": 2**64}),
    ("steps", {**OK, "steps": "20"}),
    ("sampler", {**OK, "sampler": "euler"}),
    ("sampler", {**OK, "sampler": 1}),
    ("sampler", {**OK, "sampler": None}),
    ("guidance_scale", {**OK, "guidance_scale": -0.1}),
    ("guidance_scale", {**OK, "guidance_scale": fields.MAX_GUIDANCE + 0.5}),
    ("guidance_scale", {**OK, "guidance_scale": "3"}),
    ("animation", {**OK, "animation": "yes"}),
    ("animation", {**OK, "animation": 1}),
    ("animation_frames", {**OK, "animation": True, "animation_frames": 1}),
    ("animation_frames", {**OK, "animation": True, "animation_frames": fields.MAX_ANIMATION_FRAMES + 1}),
    ("animation_fps", {**OK, "animation": True, "animation_fps": 0}),
    ("animation_fps", {**OK, "animation": True, "animation_fps": fields.MAX_ANIMATION_FPS + 1}),
    ("model", {**OK, "model": ""}),
    ("model", {**OK, "model": "a/b"}),
    ("model", {**OK, "model": "x" * 65}),
    ("model", {**OK, "model": "v9"}),  # no worker serves it
    ("model", {**OK, "model": 3}),
    ("colour", {**OK, "colour": "red"}),  # unknown field
]


@pytest.mark.parametrize(("field", "body"), INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_field_is_422_naming_it(client, conn, field, body):
    response = client.post("/generate", json=body)
    assert response.status_code == 422, response.text
    locs = [tuple(error["loc"]) for error in response.json()["detail"]]
    assert any(loc[:2] == ("body", field) for loc in locs), locs
    assert conn.llen("rq:queue:" + spec.DEFAULT_QUEUE) == 0


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_guidance_is_422_not_500(client, raw):
    response = client.post("/generate", content=f'{{"label": "smiling", "guidance_scale": {raw}}}',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "guidance_scale"]


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        ('{"label": ', "application/json", 422),
        ("[1, 2]", "application/json", 422),
        ("", "application/json", 422),
        ('"smiling"', "application/json", 422),
        ('{"label": "smiling"}', "text/plain", 415),
        ("label=smiling", "application/x-www-form-urlencoded", 415),
        ('{"label": "smiling"}', None, 415),
    ],
)
def test_malformed_body_or_content_type(client, content, content_type, status):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/generate", content=content.encode(), headers=headers)
    assert response.status_code == status, response.text
    assert "detail" in response.json()


def test_body_over_the_limit_is_413(make_client):
    client = make_client(max_body_bytes=1024)
    body = json.dumps({"label": "smiling", "padding": "x" * 2000})
    declared = client.post("/generate", content=body, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413
    assert "1024" in declared.json()["detail"]

    def chunks():  # no Content-Length: the limit applies while the body streams in
        for _ in range(8):
            yield b" " * 512

    streamed = client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert streamed.json()["detail"].startswith("request body too large")


def test_idempotency_key_header_is_validated(client):
    response = client.post("/generate", json=OK, headers={"Idempotency-Key": "k" * 256})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


def test_valid_requests_are_accepted(make_client):
    client = make_client(max_request_units=100_000)  # every bound at once costs more than the default cap allows
    for body in (
        {"label": "Smiling"},
        {"label": " NOT_SMILING "},
        {"attributes": {"smiling": False}},
        {**OK, "count": fields.MAX_COUNT, "seed": fields.MAX_SEED, "steps": fields.MAX_STEPS, "sampler": "ddpm",
         "guidance_scale": fields.MAX_GUIDANCE, "animation": True, "animation_frames": 2, "animation_fps": 1},
        {**OK, "count": 1, "seed": 0, "steps": 1, "guidance_scale": 0},
        {**OK, "animation_frames": 8, "animation_fps": 4},  # ignored without animation
    ):
        response = client.post("/generate", json=body)
        assert response.status_code == 202, (body, response.text)


def test_unknown_routes_and_methods_are_json(client):
    assert client.get("/nope").status_code == 404
    assert client.get("/nope").json() == {"detail": "Not Found"}
    response = client.put("/generate", json=OK)
    assert response.status_code == 405
    assert "detail" in response.json()


def test_body_that_is_not_utf8_is_422(client):
    response = client.post("/generate", content=b'{"label": "\xff\xfe"}', headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body"]


def test_405_lists_every_method_of_the_path(client):
    response = client.put(f"/jobs/{'0' * 8}")
    assert response.status_code == 405
    assert response.headers["Allow"] == "DELETE, GET"


def test_unexpected_errors_are_generic_500s(make_settings):
    def boom():
        raise RuntimeError("secret internal detail")

    app = create_app(make_settings())
    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}


def test_no_cors_unless_configured(make_client):
    preflight = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    closed = make_client()
    assert "access-control-allow-origin" not in closed.options("/generate", headers=preflight).headers
    assert "access-control-allow-origin" not in closed.get("/healthz", headers={"Origin": "https://x.example"}).headers

    opened = make_client(cors_origins="https://app.example, https://other.example")
    allowed = opened.options("/generate", headers={**preflight, "Origin": "https://app.example",
                                                   "Access-Control-Request-Headers": "authorization,idempotency-key"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "idempotency-key" in allowed.headers["access-control-allow-headers"].lower()
    assert opened.options("/generate", headers=preflight).status_code == 400  # origin not in the list
    simple = opened.get("/healthz", headers={"Origin": "https://other.example"})
    assert simple.headers["access-control-allow-origin"] == "https://other.example"
