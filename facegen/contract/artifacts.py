"""Where finished jobs' files live: one small interface, two stores.

The worker writes a job's artifacts (the PNG grid, the GIF, any other file a job kind makes, each under a name)
through :class:`ArtifactStore`; the API reads them through it. Which store serves is a setting
(``ARTIFACT_STORE``), read once by :func:`open_store`; nothing else branches on it.

- :class:`RedisArtifactStore` (the default, for one machine): each artifact is a Redis key
  (:func:`facegen.contract.spec.artifact_key`) that expires with the job.
- :class:`S3ArtifactStore`: each artifact is an object ``{S3_PREFIX}{job_id}/{name}`` in ``S3_BUCKET`` of any
  S3-compatible store (AWS S3, MinIO, SeaweedFS), reached with boto3's default credential chain (the standard
  ``AWS_*`` variables, a profile, an instance or pod role). The job in Redis, which expires after
  ``ARTIFACT_TTL``, stays the index: once it is gone the API answers 410 without asking the bucket. The objects
  carry their expiry time (``Expires``) and are deleted by the bucket's lifecycle rule (DEPLOYMENT.md), whose
  expiration, in whole days, is at least ``ARTIFACT_TTL``.

A store that cannot be reached raises :class:`ArtifactStoreUnavailable`: the worker's :func:`put_retrying` tries
``ARTIFACT_PUT_ATTEMPTS`` times, then the job fails with that reason; the API answers 503 for the artifact.
Imports neither torch nor FastAPI (the API process uses it); boto3 is imported only by the S3 store.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Protocol

import redis
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings

from .spec import DEFAULT_ARTIFACT_TTL_S, artifact_key

log = logging.getLogger(__name__)
DAY_S = 24 * 3600
PROBE_TIMEOUT_S = 1.0  # the store's reachability check (/readyz) waits at most this long
STREAM_CHUNK_BYTES = 64 * 1024  # what the API passes on at a time while it streams an object


class S3ClientSettings(BaseSettings):
    """Where the S3-compatible server is (``S3_ENDPOINT_URL``, ``S3_REGION``): one definition for every store on S3
    (the artifact store, the model store of :mod:`facegen.contract.model_store`)."""

    # The endpoint of an S3-compatible server (none: AWS) and the region (none: boto3's default). Credentials come
    # from boto3's default chain (AWS_ACCESS_KEY_ID, …).
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    @field_validator("s3_endpoint_url", "s3_region", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return value or None  # e.g. S3_ENDPOINT_URL= in a ConfigMap: AWS itself


class ArtifactSettings(S3ClientSettings):
    """The ``ARTIFACT_*`` and ``S3_*`` settings, shared by the API's and the worker's settings classes."""

    # redis: artifacts are Redis keys (one machine, the default); s3: objects in S3_BUCKET.
    artifact_store: Literal["redis", "s3"] = "redis"
    # Finished jobs and their artifacts live this long (RQ result_ttl; the worker uses it for artifacts too).
    artifact_ttl: Annotated[int, Field(ge=60)] = DEFAULT_ARTIFACT_TTL_S
    # With a store that can sign URLs (s3): answer artifact requests with 307 to a presigned URL valid for
    # ARTIFACT_URL_TTL_S, instead of passing the bytes through the API.
    artifact_redirect: bool = False
    artifact_url_ttl_s: Annotated[int, Field(ge=1, le=7 * DAY_S)] = 900
    # Seconds to wait for the store (connect, and each read) before counting it unreachable.
    artifact_store_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    # The worker stores a job's artifacts this many times before failing the job, waiting
    # ARTIFACT_PUT_BACKOFF_S, then twice that, … between attempts (keep the whole, with a timeout per attempt,
    # well below the worker's HEARTBEAT_TTL: the job's heartbeat is not renewed meanwhile).
    artifact_put_attempts: Annotated[int, Field(ge=1, le=10)] = 4
    artifact_put_backoff_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    # S3: the bucket and the key prefix of every artifact object (the server: S3ClientSettings).
    s3_bucket: str | None = None
    s3_prefix: str = "facegen/artifacts/"

    @field_validator("s3_bucket", mode="before")
    @classmethod
    def _empty_bucket_is_unset(cls, value: Any) -> Any:
        return value or None

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> ArtifactSettings:
        if self.artifact_store == "s3" and not self.s3_bucket:
            raise ValueError("ARTIFACT_STORE=s3 needs S3_BUCKET")
        return self

    def lifecycle_days(self) -> int:
        """The bucket lifecycle rule's expiration: ``ARTIFACT_TTL`` rounded up to whole days."""
        return math.ceil(self.artifact_ttl / DAY_S)


class ArtifactStoreUnavailable(Exception):
    """The store could not be reached (or refused the request); the message says which store and why."""


@dataclass(frozen=True)
class Artifact:
    """One file of a job: its bytes and their media type (``image/png``, ``image/gif``)."""

    data: bytes
    media_type: str


@dataclass(frozen=True)
class OpenedArtifact:
    """An artifact being read: its size in bytes and its content as chunks (read once, in order)."""

    size: int
    chunks: Iterator[bytes]

    def read(self) -> bytes:
        return b"".join(self.chunks)


class ArtifactStore(Protocol):
    """A job's artifacts, each addressed by (job id, name); names are free (``grid``, ``animation``, …)."""

    def put(self, job_id: str, files: Mapping[str, Artifact], ttl_s: int) -> dict[str, str]:
        """Store ``files`` for ``ttl_s`` seconds (overwriting); returns ``{name: where it is}``."""
        ...

    def get(self, job_id: str, name: str) -> bytes | None:
        """The artifact's bytes; ``None`` when it does not exist (expired)."""
        ...

    def open(self, job_id: str, name: str) -> OpenedArtifact | None:
        """The artifact as a stream of chunks (the API passes them on as they come); ``None`` as for ``get``. An
        error while the chunks are read raises ``ArtifactStoreUnavailable`` from the iterator."""
        ...

    def url(self, job_id: str, name: str, expires_s: int) -> str | None:
        """A URL that downloads the artifact for ``expires_s`` seconds; ``None`` when the store has none."""
        ...

    def expire(self, job_id: str, names: Iterable[str]) -> None:
        """End the artifacts' lifetime now (delete them)."""
        ...

    def ping(self) -> None:
        """Raise (``ArtifactStoreUnavailable``, ``redis.RedisError``) unless the store answers."""
        ...


class RedisArtifactStore:
    """Artifacts as Redis keys that expire on their own; Redis errors propagate as for any Redis command."""

    def __init__(self, connection: redis.Redis):
        self.connection = connection

    def put(self, job_id: str, files: Mapping[str, Artifact], ttl_s: int) -> dict[str, str]:
        keys = {name: artifact_key(job_id, name) for name in files}
        with self.connection.pipeline() as pipe:  # all or none (MULTI/EXEC)
            for name, artifact in files.items():
                pipe.set(keys[name], artifact.data, ex=ttl_s)
            pipe.execute()
        return keys

    def get(self, job_id: str, name: str) -> bytes | None:
        return self.connection.get(artifact_key(job_id, name))

    def open(self, job_id: str, name: str) -> OpenedArtifact | None:
        data = self.get(job_id, name)  # one Redis value: read whole, as Redis sends it
        return None if data is None else OpenedArtifact(len(data), iter((data,)))

    def url(self, job_id: str, name: str, expires_s: int) -> str | None:
        return None  # the API serves the bytes itself

    def expire(self, job_id: str, names: Iterable[str]) -> None:
        keys = [artifact_key(job_id, name) for name in names]
        if keys:
            self.connection.delete(*keys)

    def ping(self) -> None:
        self.connection.ping()


class S3ArtifactStore:
    """Artifacts as objects ``{prefix}{job_id}/{name}`` in one bucket of an S3-compatible store."""

    def __init__(self, settings: ArtifactSettings):
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        self.client = s3_client(settings, settings.artifact_store_timeout_s)
        # /readyz asks through a client that gives up sooner than the API's readiness probe (3 s in k8s/)
        self.probe = s3_client(settings, min(settings.artifact_store_timeout_s, PROBE_TIMEOUT_S))

    def key(self, job_id: str, name: str) -> str:
        return f"{self.prefix}{job_id}/{name}"

    def put(self, job_id: str, files: Mapping[str, Artifact], ttl_s: int) -> dict[str, str]:
        expires = datetime.now(UTC) + timedelta(seconds=ttl_s)
        locations = {}
        for name, artifact in files.items():
            key = self.key(job_id, name)
            self._call("upload", key, self.client.put_object, Bucket=self.bucket, Key=key, Body=artifact.data,
                       ContentType=artifact.media_type, Expires=expires)
            locations[name] = f"s3://{self.bucket}/{key}"
        return locations

    def get(self, job_id: str, name: str) -> bytes | None:
        opened = self.open(job_id, name)
        return None if opened is None else opened.read()

    def open(self, job_id: str, name: str) -> OpenedArtifact | None:
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.key(job_id, name)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._unavailable("download", key, exc) from None
        except BotoCoreError as exc:  # connection refused, timeouts
            raise self._unavailable("download", key, exc) from None

        def chunks() -> Iterator[bytes]:
            try:
                yield from response["Body"].iter_chunks(STREAM_CHUNK_BYTES)
            except BotoCoreError as exc:  # a body cut short
                raise self._unavailable("download", key, exc) from None
            finally:
                response["Body"].close()

        return OpenedArtifact(int(response["ContentLength"]), chunks())

    def url(self, job_id: str, name: str, expires_s: int) -> str | None:
        key = self.key(job_id, name)
        return self._call("sign", key, self.client.generate_presigned_url, "get_object",
                          Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s)

    def expire(self, job_id: str, names: Iterable[str]) -> None:
        """Delete the objects in one request; an object the store refuses to delete (``delete_objects`` answers
        200 and lists it under ``Errors``) raises as the request's own failure does."""
        objects = [{"Key": self.key(job_id, name)} for name in names]
        if not objects:
            return
        response = self._call("delete", objects[0]["Key"], self.client.delete_objects, Bucket=self.bucket,
                              Delete={"Objects": objects, "Quiet": True})
        refused = response.get("Errors", [])
        if refused:
            log.warning("S3 delete refused for %s", ", ".join(f"{e.get('Key')} ({e.get('Code')})" for e in refused))
            raise ArtifactStoreUnavailable(f"artifact store refused to delete {len(refused)} of {len(objects)} "
                                           f"objects of job {job_id} ({refused[0].get('Code')})")

    def ping(self) -> None:
        self._call("reach", self.bucket, self.probe.head_bucket, Bucket=self.bucket)

    def _call(self, action: str, key: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._unavailable(action, key, exc) from None

    def _unavailable(self, action: str, key: str, exc: Exception) -> ArtifactStoreUnavailable:
        """The error for callers, which may reach API clients (a job's ``error``): the error's type, not its text,
        which names the endpoint; that goes to the log."""
        log.warning("S3 %s of s3://%s/%s failed: %s", action, self.bucket, key, exc)
        return ArtifactStoreUnavailable(f"artifact store unreachable: could not {action} s3://{self.bucket}/{key}"
                                        f" ({type(exc).__name__})")


def s3_client(settings: S3ClientSettings, timeout: float) -> Any:
    """A boto3 S3 client that waits ``timeout`` seconds (connect, each read) and does not retry (callers decide)."""
    import boto3  # here, not at the top: a Redis-backed process never loads boto3
    from botocore.config import Config

    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 1},
                    signature_version="s3v4")
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region, config=config)


def open_store(settings: ArtifactSettings, connection: redis.Redis) -> ArtifactStore:
    """The store ``ARTIFACT_STORE`` names; ``connection`` is the process's Redis client (for the Redis store)."""
    if settings.artifact_store == "s3":
        return S3ArtifactStore(settings)
    return RedisArtifactStore(connection)


def put_retrying(store: ArtifactStore, job_id: str, files: Mapping[str, Artifact], ttl_s: int,
                 settings: ArtifactSettings) -> dict[str, str]:
    """``store.put`` up to ``ARTIFACT_PUT_ATTEMPTS`` times with doubling waits; after the last failure what the
    attempts left behind is deleted (best effort) and :class:`ArtifactStoreUnavailable` raised."""
    attempts, wait = settings.artifact_put_attempts, settings.artifact_put_backoff_s
    for attempt in range(1, attempts):
        try:
            return store.put(job_id, files, ttl_s)
        except ArtifactStoreUnavailable as exc:
            log.warning("job %s: artifacts not stored (attempt %d of %d), again in %.1f s: %s", job_id, attempt,
                        attempts, wait, exc)
        time.sleep(wait)
        wait *= 2
    try:
        return store.put(job_id, files, ttl_s)
    except ArtifactStoreUnavailable as exc:
        _forget(store, job_id, files)
        raise ArtifactStoreUnavailable(f"{exc} [after {attempts} attempts]") from None


def _forget(store: ArtifactStore, job_id: str, files: Mapping[str, Artifact]) -> None:
    try:
        store.expire(job_id, files)
    except ArtifactStoreUnavailable as exc:
        log.info("job %s: partial artifacts left to the bucket's lifecycle rule: %s", job_id, exc)
