"""The API needs only a read-only S3 identity, the one the deployments give it (k8s/overlays/s3/seaweedfs-start.sh,
run by the test SeaweedFS too): ``python -m service`` under uvicorn, signing with that identity, serves every
artifact route, the presigned redirect and /readyz, while SeaweedFS refuses that identity's writes and deletes.

The worker's side is played by the fake worker (the job in Redis) and an upload of its files with the worker's
identity, as the real worker stores them (``{S3_PREFIX}{job_id}/{name}``)."""

from __future__ import annotations

import io
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from botocore.exceptions import ClientError
from PIL import Image

from facegen.contract import spec
from tests.conftest import redis_url_for_db
from tests.service.conftest import LiveServer
from tests.service.fakeworker import FakeWorker, publish_model

REDIS_URL = redis_url_for_db(3)
KINDS = ("grid", spec.image_kind(0), spec.image_kind(1), "animation")
ANIMATION_FRAMES = 3


@pytest.fixture(scope="module")
def stack(s3_server):
    conn = redis.Redis.from_url(REDIS_URL)
    conn.flushdb()
    env = s3_server.api_env()
    api = LiveServer(REDIS_URL, env=env)
    redirecting = LiveServer(REDIS_URL, env={**env, "ARTIFACT_REDIRECT": "true"})
    try:
        yield api, redirecting, conn
    finally:
        api.stop()
        redirecting.stop()
        conn.flushdb()
        conn.close()


def object_key(s3_server, job_id: str, kind: str) -> str:
    return f"{s3_server.env()['S3_PREFIX']}{job_id}/{kind}"


@pytest.fixture(scope="module")
def finished_job(stack, s3_server) -> str:
    """A finished job of two images and a GIF whose files are in the bucket only."""
    api, _, conn = stack
    publish_model(conn, ttl=600)
    response = httpx.post(f"{api.url}/generate", json={"label": "smiling", "count": 2, "steps": 3, "animation": True,
                                                       "animation_frames": ANIMATION_FRAMES}, timeout=10)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert FakeWorker(conn).drain()
    writer = s3_server.client()  # the worker's identity
    for kind in KINDS:
        data = conn.getdel(spec.artifact_key(job_id, kind))
        assert data, kind
        writer.put_object(Bucket=s3_server.bucket, Key=object_key(s3_server, job_id, kind), Body=data,
                          ContentType="image/gif" if kind == "animation" else "image/png")
    return job_id


def test_the_api_serves_every_artifact_with_a_read_only_identity(stack, finished_job) -> None:
    api, _, conn = stack
    ready = httpx.get(f"{api.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["artifact_store"] is True  # HeadBucket is a read
    grid = httpx.get(f"{api.url}/jobs/{finished_job}/result", timeout=10)
    assert grid.status_code == 200, grid.text
    assert Image.open(io.BytesIO(grid.content)).format == "PNG"
    for index in (0, 1):
        image = httpx.get(f"{api.url}/jobs/{finished_job}/images/{index}", timeout=10)
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).format == "PNG"
    webp = httpx.get(f"{api.url}/jobs/{finished_job}/images/1", params={"format": "webp"}, timeout=10)
    assert webp.status_code == 200 and Image.open(io.BytesIO(webp.content)).format == "WEBP"
    gif = httpx.get(f"{api.url}/jobs/{finished_job}/animation", timeout=10)
    assert gif.status_code == 200 and Image.open(io.BytesIO(gif.content)).n_frames == ANIMATION_FRAMES
    assert not any(conn.exists(spec.artifact_key(finished_job, kind)) for kind in KINDS)  # from the bucket


def test_presigned_redirects_carry_the_read_only_key_and_download(stack, finished_job, s3_server) -> None:
    api, redirecting, _ = stack
    for path in ("result", "images/0", "animation"):
        redirect = httpx.get(f"{redirecting.url}/jobs/{finished_job}/{path}", timeout=10)
        assert redirect.status_code == 307, redirect.text
        location = redirect.headers["location"]
        (credential,) = parse_qs(urlsplit(location).query)["X-Amz-Credential"]
        assert credential.split("/")[0] == s3_server.api_access_key
        downloaded = httpx.get(location, timeout=10)
        assert downloaded.status_code == 200
        assert downloaded.content == httpx.get(f"{api.url}/jobs/{finished_job}/{path}", timeout=10).content


def test_the_store_refuses_the_api_identity_writes_and_deletes(finished_job, s3_server) -> None:
    reader, writer = s3_server.api_client(), s3_server.client()
    key = object_key(s3_server, finished_job, "grid")
    stored = writer.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    for write in (lambda: reader.put_object(Bucket=s3_server.bucket, Key=key, Body=b"replaced"),
                  lambda: reader.put_object(Bucket=s3_server.bucket, Key=f"{key}-new", Body=b"new"),
                  lambda: reader.delete_object(Bucket=s3_server.bucket, Key=key),
                  lambda: reader.create_bucket(Bucket="facegen-other")):
        with pytest.raises(ClientError) as refused:
            write()
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
    batch = reader.delete_objects(Bucket=s3_server.bucket, Delete={"Objects": [{"Key": key}], "Quiet": True})
    assert [error["Code"] for error in batch["Errors"]] == ["AccessDenied"]
    assert writer.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == stored  # untouched
    assert writer.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{key}-new")["KeyCount"] == 0
