"""Both artifact stores keep the same contract (put, get, open, url, expire) against real servers: the Redis store on
the test Redis, the S3 store on a SeaweedFS; an unreachable S3 store fails with a clear reason after the
configured attempts."""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import boto3
import httpx
import pytest
from PIL import Image
from pydantic import ValidationError

from facegen.contract.artifacts import (
    STREAM_CHUNK_BYTES,
    Artifact,
    ArtifactSettings,
    ArtifactStoreUnavailable,
    RedisArtifactStore,
    S3ArtifactStore,
    open_store,
    put_retrying,
)
from facegen.contract.spec import artifact_key
from scripts.redisctl import free_port
from tests.conftest import ROOT, flushed_database, redis_url_for_db
from worker.settings import WorkerSettings

REDIS_URL = redis_url_for_db(7)
JOB_ID = "5b0e8a8e-7f0c-4a57-9d4e-2f1f5a4c1b11"
TTL_S = 600


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def conn():
    yield from flushed_database(REDIS_URL)


@pytest.fixture(params=["redis", "s3"])
def store(request, conn):
    if request.param == "redis":
        return RedisArtifactStore(conn)
    return S3ArtifactStore(request.getfixturevalue("s3_settings"))


def test_put_get_expire_any_name(store) -> None:
    files = {"grid": Artifact(png((255, 0, 0)), "image/png"), "image-3": Artifact(png((0, 0, 255)), "image/png")}
    locations = store.put(JOB_ID, files, TTL_S)
    assert set(locations) == {"grid", "image-3"} and len(set(locations.values())) == 2
    assert store.get(JOB_ID, "grid") == files["grid"].data
    assert Image.open(io.BytesIO(store.get(JOB_ID, "image-3"))).getpixel((0, 0)) == (0, 0, 255)
    assert store.get(JOB_ID, "animation") is None  # never stored
    store.put(JOB_ID, {"grid": Artifact(b"GIF89a-other", "image/gif")}, TTL_S)  # a retry overwrites
    assert store.get(JOB_ID, "grid") == b"GIF89a-other"
    store.expire(JOB_ID, ["grid"])
    assert store.get(JOB_ID, "grid") is None
    assert store.get(JOB_ID, "image-3") == files["image-3"].data
    store.ping()


def test_an_s3_delete_the_store_refuses_raises(s3_server, s3_settings, monkeypatch) -> None:
    """delete_objects answers 200 with the refused keys under Errors: expire raises instead of passing it by (the
    API's identity may read, never delete)."""
    job_id = "0c7d1f2e-3b4a-4c5d-8e9f-a0b1c2d3e4f5"  # its object stays: no other test sees it
    S3ArtifactStore(s3_settings).put(job_id, {"grid": Artifact(png((1, 2, 3)), "image/png")}, TTL_S)
    for name, value in s3_server.api_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it keeps the keys it first read
    with pytest.raises(ArtifactStoreUnavailable, match="refused to delete 1 of 1 objects .*AccessDenied"):
        S3ArtifactStore(ArtifactSettings()).expire(job_id, ["grid"])
    assert S3ArtifactStore(s3_settings).get(job_id, "grid") is not None


def test_open_streams_what_put_stored(store) -> None:
    data = os.urandom(3 * STREAM_CHUNK_BYTES + 123)  # a large GIF's size class: several chunks
    store.put(JOB_ID, {"animation": Artifact(data, "image/gif")}, TTL_S)
    opened = store.open(JOB_ID, "animation")
    chunks = list(opened.chunks)
    assert opened.size == len(data) and b"".join(chunks) == data
    if isinstance(store, S3ArtifactStore):  # passed on as the store sends it, not read whole first
        assert len(chunks) >= 4 and max(len(c) for c in chunks) <= STREAM_CHUNK_BYTES
    assert store.open(JOB_ID, "grid") is None


def test_redis_store_keeps_the_existing_keys_and_ttl(conn) -> None:
    store = RedisArtifactStore(conn)
    locations = store.put(JOB_ID, {"grid": Artifact(b"png", "image/png")}, TTL_S)
    assert locations == {"grid": artifact_key(JOB_ID, "grid")}  # the keys jobs stored before the interface use
    assert conn.get(artifact_key(JOB_ID, "grid")) == b"png"
    assert 0 < conn.ttl(artifact_key(JOB_ID, "grid")) <= TTL_S
    assert store.url(JOB_ID, "grid", 60) is None  # the API serves Redis artifacts itself


def test_s3_objects_carry_type_and_expiry_and_sign_urls(s3_server, s3_settings) -> None:
    store = S3ArtifactStore(s3_settings)
    data = png((0, 255, 0))
    store.put(JOB_ID, {"grid": Artifact(data, "image/png")}, TTL_S)
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key=f"{s3_settings.s3_prefix}{JOB_ID}/grid")
    assert head["ContentType"] == "image/png"
    expires = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["expires"])
    assert 0 < (expires - datetime.now(UTC)).total_seconds() <= TTL_S
    url = store.url(JOB_ID, "grid", 60)
    download = httpx.get(url, timeout=10)
    assert download.status_code == 200 and download.content == data
    assert download.headers["content-type"] == "image/png"
    assert httpx.get(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"), timeout=10).status_code == 403


def test_settings_pick_the_store(conn, s3_settings, monkeypatch) -> None:
    assert isinstance(open_store(s3_settings, conn), S3ArtifactStore)
    monkeypatch.setenv("ARTIFACT_STORE", "redis")
    assert isinstance(open_store(ArtifactSettings(), conn), RedisArtifactStore)
    monkeypatch.setenv("ARTIFACT_STORE", "s3")
    monkeypatch.delenv("S3_BUCKET")
    with pytest.raises(ValidationError, match="S3_BUCKET"):
        ArtifactSettings()
    assert ArtifactSettings(artifact_ttl=90_000, s3_bucket="b").lifecycle_days() == 2
    monkeypatch.setenv("S3_BUCKET", "b")
    monkeypatch.setenv("S3_ENDPOINT_URL", "")  # as a ConfigMap says "AWS itself"
    assert WorkerSettings().s3_endpoint_url is None


class CountingStore(S3ArtifactStore):
    """The S3 store, counting the puts it is asked for."""

    puts = 0

    def put(self, *args, **kwargs):
        self.puts += 1
        return super().put(*args, **kwargs)


def test_an_unreachable_s3_store_fails_clearly_after_the_attempts(s3_settings) -> None:
    nowhere = s3_settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}",
                                             "artifact_store_timeout_s": 1.0, "artifact_put_attempts": 3,
                                             "artifact_put_backoff_s": 0.01})
    store = CountingStore(nowhere)
    with pytest.raises(ArtifactStoreUnavailable, match=r"artifact store unreachable.*after 3 attempts"):
        put_retrying(store, JOB_ID, {"grid": Artifact(b"png", "image/png")}, TTL_S, nowhere)
    assert store.puts == 3
    with pytest.raises(ArtifactStoreUnavailable, match="could not download"):
        store.get(JOB_ID, "grid")
    with pytest.raises(ArtifactStoreUnavailable):
        store.ping()


def test_the_documented_lifecycle_rule_is_accepted_by_a_real_s3_server(s3_server) -> None:
    rule = json.loads((ROOT / "k8s" / "overlays" / "s3" / "s3-lifecycle.json").read_text())
    client = s3_server.client()
    client.put_bucket_lifecycle_configuration(Bucket=s3_server.bucket, LifecycleConfiguration=rule)
    (stored,) = client.get_bucket_lifecycle_configuration(Bucket=s3_server.bucket)["Rules"]
    assert stored["Filter"] == rule["Rules"][0]["Filter"] and stored["Expiration"] == rule["Rules"][0]["Expiration"]
