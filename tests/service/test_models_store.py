"""The API with a model store: a real SeaweedFS started through the deployments' start script with their two
identities (scripts/s3ctl.py), versions published and aliases moved with ``ModelStore.publish`` / ``set_alias`` as
``python -m training publish`` does (the worker's identity), and ``python -m service`` over HTTP reading the store
with the API's read-only identity (read and list). GET /models lists the store's versions, cards and aliases
beside the live workers; POST /generate and POST /edit accept a version only the store holds, and pin a job that
names an alias to the version it points at; an unreachable store costs only what needs it (503, never 500).

The store's versions are the bundled model and two made from it in a few milliseconds (a newer version with two
attributes, a distilled student of the bundled one): a copy of its manifest with another name, sealed again, and
its weight files linked, so publishing them uploads no weights. The last test stops the store."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import boto3
import httpx
import pytest
import redis
from PIL import Image

from facegen.contract.model_store import MANIFEST_FILE, ModelStore, ModelStoreSettings, manifest_integrity
from facegen.model.checkpoints import BUNDLED_CHECKPOINTS, resolve_version
from scripts.s3ctl import REGION, S3Server
from tests.service.conftest import LiveServer
from tests.service.fakeworker import model_info, publish_model, publish_worker

BUNDLED = resolve_version(BUNDLED_CHECKPOINTS, "diffusion", "latest").name
NEWER = "20261207-000000-abcdef"  # two attributes
STUDENT = "20261208-000000-fedcba"  # a student of BUNDLED
UNKNOWN = "20990101-000000-000000"
STORE_PREFIX = "models"


@dataclass(frozen=True)
class Published:
    store: ModelStore  # with the worker's identity (the publisher's)
    env: dict[str, str]  # the API's settings: the read-only identity, MODEL_STORE


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


def derived_version(root: Path, version: str, created_at: str, **changes: object) -> Path:
    """``root/diffusion/<version>``: the bundled diffusion version under another name, created at ``created_at``,
    with ``changes`` to its manifest, sealed again, without an evaluation record; its weights (and the VAE folder)
    are links to the bundled files."""
    source = BUNDLED_CHECKPOINTS / "diffusion" / BUNDLED
    folder = root / "diffusion" / version
    folder.mkdir(parents=True)
    manifest = {**json.loads((source / MANIFEST_FILE).read_text()), "version": version, "created_at": created_at,
                **changes}
    manifest["integrity"] = manifest_integrity(manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    for name in manifest["files"]:
        (folder / name).symlink_to(source / name)
    vae = root / "vae" / manifest["vae_version"]
    if not vae.exists():
        vae.parent.mkdir(exist_ok=True)
        vae.symlink_to(BUNDLED_CHECKPOINTS / "vae" / manifest["vae_version"])
    return folder


@pytest.fixture(scope="module")
def published(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Published:
    """The bundled version, NEWER and STUDENT published by alice, alias ``stable`` -> BUNDLED."""
    location = f"s3://{s3_server.bucket}/{STORE_PREFIX}"
    root = tmp_path_factory.mktemp("derived")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3_server.env().items():
            patch.setenv(name, value)
        boto3.DEFAULT_SESSION = None  # the client below reads the worker's keys (and keeps them)
        store = ModelStore(ModelStoreSettings(model_store=location, s3_endpoint_url=s3_server.endpoint_url,
                                              s3_region=REGION))
    boto3.DEFAULT_SESSION = None
    store.publish(BUNDLED_CHECKPOINTS / "diffusion" / BUNDLED, "alice@test")
    store.publish(derived_version(root, NEWER, "2026-12-07T00:00:00+00:00", attributes=["Smiling", "Eyeglasses"]),
                  "alice@test")
    store.publish(derived_version(root, STUDENT, "2026-12-08T00:00:00+00:00",
                                  distillation={"teacher": BUNDLED, "method": "lcm"}), "alice@test")
    store.set_alias("stable", BUNDLED, "alice@test")
    return Published(store, {**s3_server.api_env(), "MODEL_STORE": location})


@pytest.fixture(scope="module")
def api(redis_url: str, published: Published) -> Iterator[LiveServer]:
    """``python -m service`` with the store, listing it for every request that needs it (cache 0)."""
    server = LiveServer(redis_url, env={**published.env, "MODEL_STORE_CACHE_S": "0", "READYZ_CACHE_S": "0"})
    yield server
    server.stop()


def generate(api: LiveServer, **body: object) -> httpx.Response:
    return httpx.post(f"{api.url}/generate", json={"label": "smiling", "count": 1, **body}, timeout=30)


def queued_model(api: LiveServer, answer: httpx.Response) -> tuple[str, dict[str, bool]]:
    """The model and attributes of the job a 202 queued, as GET /jobs/{id} shows them."""
    assert answer.status_code == 202, answer.text
    parameters = httpx.get(f"{api.url}{answer.json()['links']['self']}", timeout=10).json()["parameters"]
    return parameters["model"], parameters["attributes"]


def refused_field(answer: httpx.Response) -> tuple[list[str], str]:
    assert answer.status_code == 422, answer.text
    (problem,) = answer.json()["detail"]
    return problem["loc"], problem["msg"]


def test_models_lists_the_store_through_the_read_only_identity(api: LiveServer, published: Published,
                                                               conn: redis.Redis) -> None:
    publish_model(conn)
    worker = publish_worker(conn, "worker-a", serves="fake-v1", model_version="stable")
    body = httpx.get(f"{api.url}/models", timeout=30).json()
    assert [m["version"] for m in body["models"]] == ["fake-v1"] and body["latest"] == "fake-v1"
    assert body["workers"] == [worker.model_dump()]
    store = body["store"]
    assert (store["location"], store["reachable"], store["error"]) == (published.store.location, True, None)
    versions = {entry["version"]: entry for entry in store["versions"]}
    assert list(versions) == [BUNDLED, NEWER, STUDENT]  # oldest first; no VAE
    bundled = versions[BUNDLED]
    record = published.store.record(BUNDLED)
    assert bundled["card"] == record.card and bundled["card"]["settings"]  # the evaluation record's numbers
    assert (bundled["vae_version"], bundled["attributes"], bundled["published_by"], bundled["student_of"]) == (
        record.manifest["vae_version"], ["Smiling"], "alice@test", None)
    assert versions[NEWER]["attributes"] == ["Smiling", "Eyeglasses"]
    assert versions[STUDENT]["student_of"] == BUNDLED
    stable = store["aliases"]["stable"]
    move = published.store.aliases()["stable"]
    assert (stable["version"], stable["previous"], stable["moved_by"]) == (BUNDLED, None, "alice@test")
    assert datetime.fromisoformat(stable["moved_at"]) == datetime.fromisoformat(move.at)


def test_one_model_is_found_live_then_in_the_store(api: LiveServer, conn: redis.Redis) -> None:
    publish_model(conn)
    assert httpx.get(f"{api.url}/models/fake-v1", timeout=10).json()["device"] == "cpu"  # a live one
    newer = httpx.get(f"{api.url}/models/{NEWER}", timeout=10)
    assert newer.status_code == 200 and newer.json()["attributes"] == ["Smiling", "Eyeglasses"]
    assert httpx.get(f"{api.url}/models/stable", timeout=10).json()["version"] == BUNDLED
    for missing in (UNKNOWN, "nothing-here"):
        answer = httpx.get(f"{api.url}/models/{missing}", timeout=10)
        assert answer.status_code == 404 and "model store" in answer.json()["detail"]


def test_a_job_may_name_a_store_version_and_is_pinned_to_an_aliases_version(api: LiveServer, published: Published,
                                                                           conn: redis.Redis) -> None:
    publish_model(conn)  # a live worker serves fake-v1 (attribute Smiling)
    assert queued_model(api, generate(api, label="eyeglasses", model=NEWER)) == (NEWER, {"Eyeglasses": True})
    assert queued_model(api, generate(api)) == ("latest", {"Smiling": True})  # the store is not asked
    published.store.set_alias("canary", BUNDLED, "alice@test")
    before = generate(api, model="canary")
    assert queued_model(api, before) == (BUNDLED, {"Smiling": True})
    published.store.set_alias("canary", NEWER, "bob@test")
    assert queued_model(api, generate(api, model="canary", label="not_eyeglasses")) == (NEWER, {"Eyeglasses": False})
    assert queued_model(api, before)[0] == BUNDLED  # a queued job keeps the version it was pinned to
    face = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 150, 120)).save(face, format="PNG")
    edit = httpx.post(f"{api.url}/edit", data={"label": "smiling", "model": "canary"},
                      files={"image": ("face.png", face.getvalue())}, timeout=30)
    assert queued_model(api, edit) == (NEWER, {"Smiling": True})

    loc, message = refused_field(generate(api, label="eyeglasses", model=BUNDLED))  # not one of its attributes
    assert loc == ["body", "label"]
    loc, message = refused_field(generate(api, model=STUDENT))
    assert loc == ["body", "model"] and f"student of {BUNDLED}" in message
    for unknown in (UNKNOWN, "no-such-alias"):
        loc, message = refused_field(generate(api, model=unknown))
        assert loc == ["body", "model"] and "model store has no version or alias" in message


def test_readyz_reports_each_live_workers_served_version(api: LiveServer, conn: redis.Redis) -> None:
    first = publish_worker(conn, "worker-a", serves="v1", model_version="stable")
    unready = httpx.get(f"{api.url}/readyz", timeout=10)
    assert unready.status_code == 503 and unready.json()["workers"] == [first.model_dump()]  # no entry of v1 yet
    publish_model(conn, model_info("v1", is_latest=False))  # written last by a worker that serves v2
    second = publish_worker(conn, "worker-b", serves="v2", loaded=["v1", "v2"])
    ready = httpx.get(f"{api.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["latest_model"] == "v1"  # worker-a serves it for "latest"
    assert ready.json()["workers"] == [first.model_dump(), second.model_dump()]


class SilentServer:
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def close(self) -> None:
        self.listener.close()


def test_a_silent_store_costs_a_request_at_most_its_timeout(make_client, conn: redis.Redis,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    silent = SilentServer()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "facegen-api")  # requests are signed, then sent to nobody
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unused")
    boto3.DEFAULT_SESSION = None
    try:
        client = make_client(model_store="s3://facegen/models", s3_endpoint_url=silent.url, s3_region=REGION,
                             model_store_timeout_s=0.5, model_store_cache_s=0)
        publish_model(conn)
        body = client.get("/models").json()
        assert body["latest"] == "fake-v1" and body["store"]["reachable"] is False
        assert body["store"]["versions"] is None and "s3://facegen/models/" in body["store"]["error"]
        answer = client.post("/generate", json={"label": "smiling", "model": "stable"})
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
        assert client.post("/generate", json={"label": "smiling"}).status_code == 202
        metrics = client.get("/metrics").text
        assert 'facegen_api_jobs_rejected_total{reason="model_store_unavailable"} 1.0' in metrics
    finally:
        silent.close()
        boto3.DEFAULT_SESSION = None


def test_a_listing_is_reused_for_model_store_cache_s(make_client, published: Published, conn: redis.Redis,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, published.env[name])
    boto3.DEFAULT_SESSION = None  # the API's identity, read when the app opens the store
    try:
        client = make_client(model_store_cache_s=30, s3_endpoint_url=published.env["S3_ENDPOINT_URL"],
                             model_store=published.env["MODEL_STORE"], s3_region=REGION)
    finally:
        boto3.DEFAULT_SESSION = None
    catalog = client.app.state.services.model_store
    now = [1000.0]
    catalog.clock = lambda: now[0]  # seconds, advanced by the test
    assert "beta" not in client.get("/models").json()["store"]["aliases"]
    published.store.set_alias("beta", NEWER, "alice@test")
    now[0] += 29
    assert "beta" not in client.get("/models").json()["store"]["aliases"]  # the listing of 29 s ago
    assert client.post("/generate", json={"label": "smiling", "model": "beta"}).status_code == 422
    now[0] += 1
    assert client.get("/models").json()["store"]["aliases"]["beta"]["version"] == NEWER
    assert client.post("/generate", json={"label": "smiling", "model": "beta"}).status_code == 202


def test_a_stopped_store_leaves_the_live_models_and_known_versions_served(api: LiveServer, s3_server: S3Server,
                                                                          conn: redis.Redis) -> None:
    """Last in this module: it stops the store."""
    publish_model(conn)
    assert queued_model(api, generate(api, model=NEWER))[0] == NEWER  # listed once by this process
    s3_server.kill()
    body = httpx.get(f"{api.url}/models", timeout=30)
    assert body.status_code == 200 and body.json()["latest"] == "fake-v1"
    store = body.json()["store"]
    assert store["reachable"] is False and store["error"] and store["aliases"] is None
    assert queued_model(api, generate(api, model=NEWER))[0] == NEWER  # versions never change: still known
    assert queued_model(api, generate(api))[0] == "latest"
    for needs_the_store in ("stable", UNKNOWN):  # an alias may have moved; a new version may have been published
        answer = generate(api, model=needs_the_store)
        assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
        assert "model store" in answer.json()["detail"]
    assert httpx.get(f"{api.url}/models/{NEWER}", timeout=10).status_code == 200
    assert httpx.get(f"{api.url}/models/{UNKNOWN}", timeout=10).status_code == 503
    assert httpx.get(f"{api.url}/readyz", timeout=10).status_code == 200
