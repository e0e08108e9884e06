"""A SeaweedFS S3 server per test module (scripts/s3ctl.py), a model store under a prefix of its own per test, and
a TCP proxy to the server that cuts its answers short."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from facegen.contract.model_store import ModelStore, ModelStoreSettings
from facegen.model.checkpoints import BUNDLED_CHECKPOINTS, read_manifest, resolve_version
from scripts.s3ctl import REGION, S3Server

# The bundled (demo) model: a diffusion version and the VAE it names, ~23 MB with their evaluation records.
BUNDLED_DIFFUSION = resolve_version(BUNDLED_CHECKPOINTS, "diffusion", "latest").name
BUNDLED_VAE = read_manifest(BUNDLED_CHECKPOINTS / "diffusion" / BUNDLED_DIFFUSION).vae_version


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def store_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The environment of a process using a store of this test's own (``MODEL_STORE`` with a fresh prefix), also
    set in this process. boto3's default session keeps the credentials it first read: it is dropped before and
    after, so that each test module's server (with keys of its own) is reached with its keys."""
    env = {**s3_server.env(), "MODEL_STORE": f"s3://{s3_server.bucket}/models-{uuid.uuid4().hex[:8]}"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    boto3.DEFAULT_SESSION = None
    yield env
    boto3.DEFAULT_SESSION = None


@pytest.fixture
def store(store_env: dict[str, str]) -> ModelStore:
    return ModelStore(ModelStoreSettings())


def bucket_keys(server: S3Server, store: ModelStore) -> dict[str, str]:
    """``{key: ETag}`` of every object under the store's prefix."""
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=store.prefix)
    return {item["Key"]: item["ETag"] for page in pages for item in page.get("Contents", ())}


def files_under(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` (hidden ones too), relative, sorted."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


class CuttingProxy:
    """A TCP proxy to ``127.0.0.1:upstream_port`` that closes a connection once it has passed ``limit`` bytes of
    answers on it: a download cut short by the network."""

    def __init__(self, upstream_port: int, limit: int):
        self.upstream_port, self.limit = upstream_port, limit
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.limit), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        passed = 0
        try:
            while data := source.recv(65536):
                if limit is not None and passed + len(data) > limit:
                    sink.sendall(data[: limit - passed])
                    self.cuts += 1
                    break
                sink.sendall(data)
                passed += len(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def cutting_store(s3_server: S3Server, store_env: dict[str, str]) -> Iterator[tuple[ModelStore, CuttingProxy]]:
    """The test's store reached through a proxy that cuts each connection after 256 KiB of answers (records and
    manifests pass whole; weight files do not)."""
    proxy = CuttingProxy(s3_server.ports["s3"], 256 * 1024)
    yield ModelStore(ModelStoreSettings(s3_endpoint_url=proxy.url, s3_region=REGION)), proxy
    proxy.close()
