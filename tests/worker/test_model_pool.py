"""The worker's model pool (worker/models.py) against a real SeaweedFS model store: versions pulled and verified at
start and for the jobs that name them, the least recently used unloaded past ``LOADED_MODELS_MAX_MIB``, an alias
followed between batches (the old version still loaded for pinned jobs), an unreachable store riding out a poll;
and real ``python -m worker`` processes where the behaviour is the process's (exit codes, pinned jobs, the
registry entries)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from PIL import Image
from rq import Queue
from rq.job import JobStatus

from facegen.contract.job_serializer import JOB_SERIALIZER
from facegen.contract.model_store import (
    ModelStore,
    ModelStoreSettings,
    VerificationError,
    open_model_store,
)
from facegen.contract.spec import (
    DEFAULT_QUEUE,
    LATEST,
    META_ERROR,
    META_RESOLVED,
    PROVENANCE_KEY,
    WORKER_INDEX_KEY,
    ModelInfo,
    WorkerServing,
    artifact_key,
    model_registry_key,
    worker_registry_key,
)
from facegen.model.checkpoints import WEIGHTS_FILE, derive_checkpoint, served_versions
from scripts.processes import free_port
from scripts.s3ctl import S3Server
from tests.conftest import ROOT, flushed_database
from tests.model_store.conftest import files_under, s3_server, store_env  # noqa: F401 - fixtures
from tests.reliability.conftest import WorkerProcess, wait_for
from tests.worker.test_worker_process import REDIS_URL, enqueue, worker_env
from worker.errors import PermanentJobError
from worker.metrics import WorkerMetrics
from worker.models import ModelPool
from worker.settings import WorkerSettings

ACTOR = "tester@test"


def nudged(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Other weights (so other images and another sha256) of the same shapes."""
    return {name: tensor * 1.05 if tensor.is_floating_point() else tensor for name, tensor in state.items()}


@pytest.fixture(scope="module")
def versions(tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A checkpoints folder with three plain diffusion versions of the tiny model (other weights each), oldest
    first, and their names."""
    root = tmp_path_factory.mktemp("pool") / "checkpoints"
    shutil.copytree(tiny_checkpoints, root)
    first, _ = served_versions(root, LATEST)
    names = [first]
    for _ in range(2):
        names.append(derive_checkpoint(root, "diffusion", names[-1], weights=nudged).name)
    return root, names


@pytest.fixture
def store(store_env: dict[str, str], versions: tuple[Path, list[str]]) -> ModelStore:  # noqa: F811
    """The test's store with the three versions published and ``stable`` pointing at the first."""
    root, names = versions
    store = ModelStore(ModelStoreSettings())
    for name in names:
        store.publish(root / "diffusion" / name, ACTOR)
    store.set_alias("stable", names[0], ACTOR)
    return store


@pytest.fixture
def connection() -> Iterator[redis.Redis]:
    yield from flushed_database(REDIS_URL)


def make_pool(cache: Path, **settings) -> ModelPool:
    """A pool on the tiny model's CPU settings reading the store of the environment (``store_env``)."""
    worker_settings = WorkerSettings(checkpoint_dir=cache, device="cpu", precision="fp32", max_batch=4, **settings)
    return ModelPool(worker_settings, WorkerMetrics(), open_model_store(worker_settings))


def pulls(pool: ModelPool, outcome: str) -> float:
    return pool.metrics.registry.get_sample_value("facegen_worker_model_pulls_total", {"outcome": outcome}) or 0.0


def no_keep_alive() -> None:
    pass


def provenance(png: bytes) -> dict:
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return json.loads(image.text[PROVENANCE_KEY])


def tamper(server: S3Server, store: ModelStore, version: str) -> str:
    """Replace the weights blob of ``version`` in the bucket by other bytes; returns the sha256 expected."""
    expected = store.record(version).files[WEIGHTS_FILE].sha256
    client, key = server.client(), store.blob_key(expected)
    data = client.get_object(Bucket=server.bucket, Key=key)["Body"].read()
    client.put_object(Bucket=server.bucket, Key=key, Body=data[:-1] + bytes([data[-1] ^ 0xFF]))
    return expected


# ----- the pool, driven directly ----------------------------------------------------------------------------------


def test_the_version_an_alias_names_is_pulled_verified_and_served(store: ModelStore, versions, tmp_path) -> None:
    root, names = versions
    pool = make_pool(tmp_path / "cache", model_version="stable")
    engine = pool.start()
    assert engine.version == names[0] and pool.served is engine and pool.alias == "stable"
    pulled = tmp_path / "cache" / "diffusion" / names[0]
    assert (pulled / WEIGHTS_FILE).read_bytes() == (root / "diffusion" / names[0] / WEIGHTS_FILE).read_bytes()
    assert not [name for name in files_under(tmp_path / "cache") if "/." in f"/{name}"]  # no staging left
    assert pulls(pool, "pulled") == 1
    assert pool.metrics.registry.get_sample_value("facegen_worker_model_info", {
        "version": names[0], "vae_version": engine.model.manifest.vae_version, "device": "cpu",
        "dtype": "float32"}) == 1

    latest = make_pool(tmp_path / "other", model_version=LATEST).start()
    assert latest.version == names[-1]  # the newest version published


def test_a_tampered_blob_is_refused_at_start_and_nothing_is_loaded(s3_server: S3Server,  # noqa: F811
                                                                   store: ModelStore, versions, tmp_path) -> None:
    _, names = versions
    expected = tamper(s3_server, store, names[0])
    pool = make_pool(tmp_path / "cache", model_version="stable")
    with pytest.raises(VerificationError, match=f"diffusion {names[0]}: {WEIGHTS_FILE}: sha256 .* does not match "
                                                f"the manifest's {expected}"):
        pool.start()
    assert pool.engines == {} and pool.served is None
    assert files_under(tmp_path / "cache" / "diffusion") == []
    assert pulls(pool, "refused") == 1 and pulls(pool, "pulled") == 0


def test_a_version_a_job_names_is_pulled_and_one_that_cannot_be_had_fails_with_the_reason(
        s3_server: S3Server, store: ModelStore, versions, tmp_path) -> None:  # noqa: F811
    _, names = versions
    pool = make_pool(tmp_path / "cache", model_version="stable")
    served = pool.start()
    assert pool.ready(names[1]) is None
    engine = pool.engine(names[1], no_keep_alive)
    assert engine.version == names[1] and pool.served is served  # pinned: "latest" stays where it was
    assert pool.ready(names[1]) is engine and pool.ready(LATEST) is served
    assert list(pool.engines) == [names[1], names[0]]  # least recently used first

    tamper(s3_server, store, names[2])
    with pytest.raises(PermanentJobError, match=f"model '{names[2]}' is not served by this worker: .*sha256 .* "
                                                "does not match"):
        pool.engine(names[2], no_keep_alive)
    with pytest.raises(PermanentJobError, match="model '20990101-000000-000000' is not served by this worker: no "
                                                "diffusion version"):
        pool.engine("20990101-000000-000000", no_keep_alive)
    assert list(pool.engines) == [names[1], names[0]]
    assert sorted(path.name for path in (tmp_path / "cache" / "diffusion").iterdir()) == names[:2]  # nothing else
    assert (pulls(pool, "pulled"), pulls(pool, "refused"), pulls(pool, "not_published")) == (2, 1, 1)


def test_the_least_recently_used_version_is_unloaded_never_the_served_one(store: ModelStore, versions,
                                                                          tmp_path) -> None:
    _, names = versions
    pool = make_pool(tmp_path / "cache", model_version="stable", loaded_models_max_mib=0)
    served = pool.start()
    pool.engine(names[1], no_keep_alive)
    assert list(pool.engines) == [names[0], names[1]]  # the one just loaded stays for its batch
    pool.engine(names[2], no_keep_alive)
    assert list(pool.engines) == [names[0], names[2]] and pool.served is served
    assert pool.metrics.registry.get_sample_value("facegen_worker_loaded_model_bytes", {"version": names[1]}) is None
    assert pool.metrics.registry.get_sample_value("facegen_worker_loaded_model_bytes", {"version": names[2]}) > 0

    roomy = make_pool(tmp_path / "cache", model_version="stable")  # the default budget holds all three
    roomy.start()
    for name in names[1:]:
        roomy.engine(name, no_keep_alive)
    roomy.ready(names[1])
    assert list(roomy.engines) == [names[0], names[2], names[1]]  # least recently used first


def test_a_moved_alias_is_served_from_the_next_poll_and_the_old_version_answers_pinned_jobs(
        store: ModelStore, versions, tmp_path) -> None:
    _, names = versions
    pool = make_pool(tmp_path / "cache", model_version="stable", model_alias_poll_s=3600)
    old = pool.start()
    store.set_alias("stable", names[1], ACTOR)
    pool.follow_alias()  # not due: the alias was looked at when the worker started
    assert pool.version_for(LATEST) == names[0] and pool.ready(LATEST) is old

    pool.next_poll = 0  # the poll interval has passed
    pool.follow_alias()
    assert pool.version_for(LATEST) == names[1] and pool.ready(LATEST) is None  # the next "latest" batch loads it
    assert pool.served is old  # until then, and for batches already claimed
    new = pool.engine(LATEST, no_keep_alive)
    assert new.version == names[1] and pool.served is new and pool.ready(LATEST) is new
    assert pool.ready(names[0]) is old  # pinned jobs keep their version

    store.set_alias("stable", names[0], ACTOR)  # roll-back: the old version is still loaded
    pool.next_poll = 0
    pool.follow_alias()
    assert pool.served is old and pool.ready(LATEST) is old and pulls(pool, "pulled") == 2


def test_an_alias_moved_to_a_tampered_version_leaves_latest_where_it_was(s3_server: S3Server,  # noqa: F811
                                                                         store: ModelStore, versions,
                                                                         tmp_path) -> None:
    _, names = versions
    pool = make_pool(tmp_path / "cache", model_version="stable")
    old = pool.start()
    tamper(s3_server, store, names[2])
    store.set_alias("stable", names[2], ACTOR)
    pool.next_poll = 0
    pool.follow_alias()
    assert pool.engine(LATEST, no_keep_alive) is old and pool.served is old
    pool.next_poll = 0
    pool.follow_alias()  # the refused version is not pulled again at every poll
    assert pool.version_for(LATEST) == names[0] and pulls(pool, "refused") == 1


class Link:
    """A TCP forwarder to ``127.0.0.1:upstream_port`` that can be cut (its listener and every connection through it
    closed: the store unreachable, as when the network between them fails) and restored on the same port."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        for connection in [self.listener, *self.open]:  # shutdown wakes the thread blocked in accept()
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()
        self.open = []

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()


def test_a_store_unreachable_during_a_poll_warns_once_and_serving_goes_on(
        s3_server: S3Server, store: ModelStore, versions, tmp_path, caplog) -> None:  # noqa: F811
    _, names = versions
    link = Link(s3_server.ports["s3"])
    pool = make_pool(tmp_path / "cache", model_version="stable", s3_endpoint_url=link.url, model_store_timeout_s=2)
    old = pool.start()
    store.set_alias("stable", names[1], ACTOR)
    link.cut()
    try:
        with caplog.at_level(logging.WARNING, logger="worker.models"):
            for _ in range(3):
                pool.next_poll = 0  # the poll interval has passed
                pool.follow_alias()
        warnings = [r.getMessage() for r in caplog.records if r.name == "worker.models"]
        assert len(warnings) == 1, warnings  # once per outage
        assert warnings[0].startswith("cannot look up alias stable (model store: could not download ")
        assert warnings[0].endswith(f": serving {names[0]} meanwhile")
        assert pool.ready(LATEST) is old and pool.served is old
    finally:
        link.restore()
    pool.next_poll = 0
    pool.follow_alias()  # reachable again: the move is seen
    assert pool.engine(LATEST, no_keep_alive).version == names[1]
    link.cut()


# ----- real worker processes ----------------------------------------------------------------------------------


def run_worker(cache: Path, store_env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:  # noqa: F811
    """``python -m worker --burst`` on the store of ``store_env`` (its artifacts in Redis, as the tests read them)."""
    env = worker_env(cache, **{**store_env, "ARTIFACT_STORE": "redis", "PRECISION": "fp32", **extra})
    return subprocess.run([sys.executable, "-m", "worker", "--burst", "--name", "pool-test"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_worker_pulls_what_pinned_jobs_name_and_fails_those_it_cannot_have(
        s3_server: S3Server, store: ModelStore, store_env: dict[str, str], versions,  # noqa: F811
        connection: redis.Redis, tmp_path) -> None:
    _, names = versions
    tamper(s3_server, store, names[2])
    queue = Queue(DEFAULT_QUEUE, connection=connection, serializer=JOB_SERIALIZER)
    latest, pinned, tampered, absent = (enqueue(queue, seed=1), enqueue(queue, seed=1, model=names[1]),
                                        enqueue(queue, model=names[2]), enqueue(queue, model="20990101-000000-000000"))
    worker = WorkerProcess(REDIS_URL, tmp_path / "cache", **{**store_env, "ARTIFACT_STORE": "redis",
                                                            "MODEL_VERSION": "stable"})
    try:
        wait_for(lambda: all(job.get_status(refresh=True) in (JobStatus.FINISHED, JobStatus.FAILED)
                             for job in (latest, pinned, tampered, absent)), 180, "the jobs to end")
        expected = WorkerServing(worker="", model_version="stable", serves=names[0], loaded=[names[0], names[1]])

        def serving() -> WorkerServing | None:  # published again as soon as the pool changed
            (name,) = connection.smembers(WORKER_INDEX_KEY)
            entry = WorkerServing.model_validate_json(connection.get(worker_registry_key(name.decode())))
            return entry if entry.model_copy(update={"worker": ""}) == expected else None

        wait_for(serving, 30, f"the worker's entry to read {expected}")
        assert ModelInfo.model_validate_json(connection.get(model_registry_key(names[0]))).is_latest
        assert not ModelInfo.model_validate_json(connection.get(model_registry_key(names[1]))).is_latest
    finally:
        worker.stop()
    log = worker.log_path.read_text()
    for job in (latest, pinned, tampered, absent):
        job.refresh()
    for job, version in ((latest, names[0]), (pinned, names[1])):
        assert job.get_status() == JobStatus.FINISHED, (job.meta, log[-3000:])
        assert job.meta[META_RESOLVED]["model"] == version
        record = provenance(connection.get(artifact_key(job.id, "grid")))
        assert record["model"] == version
        weights = tmp_path / "cache" / "diffusion" / version / WEIGHTS_FILE
        assert record["model_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    for job, reason in ((tampered, f"model '{names[2]}' is not served by this worker: diffusion {names[2]}: "
                                   f"{WEIGHTS_FILE}: sha256 "),
                        (absent, "model '20990101-000000-000000' is not served by this worker: no diffusion version")):
        assert job.get_status() == JobStatus.FAILED and job.retries_left == 0
        assert job.meta[META_ERROR].startswith(reason) and "Traceback" not in job.meta[META_ERROR]
    assert log.count(f"model {names[2]} cannot be served: ") == 1


def test_the_worker_exits_2_on_a_tampered_version_and_1_on_an_unreachable_store(
        s3_server: S3Server, store: ModelStore, store_env: dict[str, str], versions, tmp_path) -> None:  # noqa: F811
    _, names = versions
    tamper(s3_server, store, names[0])
    tampered = run_worker(tmp_path / "cache", store_env, MODEL_VERSION="stable")
    assert tampered.returncode == 2, tampered.stderr[-3000:]
    refusal = [line for line in tampered.stderr.splitlines() if line.startswith("worker: ")]
    assert len(refusal) == 1 and f"diffusion {names[0]}: {WEIGHTS_FILE}: sha256 " in refusal[0]
    assert "Traceback" not in tampered.stderr
    assert files_under(tmp_path / "cache" / "diffusion") == []

    nowhere = run_worker(tmp_path / "cache", store_env, MODEL_VERSION="stable",
                         S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", MODEL_STORE_TIMEOUT_S="2")
    assert nowhere.returncode == 1, nowhere.stderr[-3000:]
    assert "worker: cannot reach the model store to load model 'stable'" in nowhere.stderr
    assert "Traceback" not in nowhere.stderr
