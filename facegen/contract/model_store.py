"""The model store: published model versions, and the aliases that name them, in an S3-compatible bucket.

A version is trained and sealed under ``<checkpoints>/<kind>/<version>/`` (:mod:`facegen.model.checkpoints`:
``manifest.json`` with the sha256 of every weight file and an ``integrity`` hash of itself, the weights, an
``evaluation.json`` beside them), published once (``python -m training publish VERSION``) and pulled by each worker
into its local cache, the same ``CHECKPOINT_DIR/<kind>/<version>/`` layout it loads from. ``MODEL_STORE=
s3://bucket/prefix`` names the store (unset: no store); the server and the credentials are those of the artifact
store (:class:`S3ClientSettings`, boto3's default chain), with its timeout policy (:func:`s3_client`: a connect and a
read timeout, ``MODEL_STORE_TIMEOUT_S``, and no retries inside boto3: callers decide).

Objects under ``<prefix>/``:

- ``blobs/sha256/<hex>``: every file of every version, named by the sha256 of its bytes. Publishing asks (HEAD)
  before it uploads, so a re-publish uploads nothing, and writes only where nothing is (``If-None-Match: *``): an
  object is never replaced under its name. Versions that share a file (a retune keeps its source's weights) share
  its blob.
- ``versions/<kind>/<version>.json``: the version's :class:`VersionRecord`: its files (name -> sha256, size), the
  manifest, the evaluation record, the model-card numbers (:func:`model_card`), the versions it needs (a diffusion
  version's VAE) and who published it when. Written once, after the blobs it names and the versions it needs, so a
  record in the store means all of them are there. A different record under an existing name is refused
  (:class:`RecordConflict`); the same one again is a no-op.
- ``aliases/<name>/history/<UTC time>-<uuid>.json``: one :class:`AliasMove` per move of an alias (who, when, from,
  to), never overwritten; the keys sort in the order of the moves. ``aliases/<name>/current.json``: the latest move,
  where the alias points now (two people moving one alias at once: the last write wins the pointer, the history
  keeps both moves).

Pulling (:meth:`ModelStore.pull`) downloads a version (after the versions it needs) into a hidden folder beside its
place in the cache, checks ``manifest.json`` against the record's sha256 and its own ``integrity`` hash, then every
other file against the manifest's sha256 (the evaluation record against the record's), and only then renames the
folder into place: a tampered object or a download cut short raises one :class:`VerificationError` naming the file
and both hashes, and leaves nothing in the cache. A version already in the cache is checked, not downloaded again.

What the worker and the API call (``open_model_store(settings)`` gives ``None`` without ``MODEL_STORE``):

- the worker, at start and when a job names a version it lacks: ``version = store.resolve(MODEL_VERSION)`` (an alias
  or a version), then ``store.pull(version, CHECKPOINT_DIR)``, which returns the folder
  ``facegen.model.checkpoints.load_checkpoint`` reads; following an alias is one ``resolve`` (one GET) per poll;
- ``GET /models``: ``store.versions()`` (records, each with its ``card``) and ``store.aliases()``;
- errors: every failure is a :class:`ModelStoreError`: :class:`ModelStoreUnavailable` (the server cannot be reached
  or refuses: transient), :class:`NotPublished`, :class:`RecordConflict`, :class:`VerificationError`.

Permissions: reading a record or an alias and pulling need ``GetObject`` under the prefix; listing
(``versions``, ``aliases``, ``alias_history``) needs ``ListBucket`` on it too (SeaweedFS: ``List``); publishing and
moving aliases need ``PutObject``. No call deletes anything.

Imports neither torch nor FastAPI (the API lists the store with it); boto3 only when a store is opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from . import fields
from .artifacts import S3ClientSettings, s3_client

log = logging.getLogger(__name__)

SERVED_KIND = "diffusion"  # what workers serve and aliases name; the VAE it needs travels with it
MANIFEST_FILE = "manifest.json"  # the sealed manifest of facegen.model.checkpoints
EVALUATION_FILE = "evaluation.json"  # numbers measured after sealing, beside the version
DOWNLOAD_CHUNK_BYTES = 1 << 20
# A kind or a version: a model version as requests name it (facegen/contract/fields.py), not starting with a dot
# (so never "." or "..": it is also a folder of the local cache).
NAME_PATTERN = re.compile(rf"(?!\.){fields.MODEL_VERSION_PATTERN.strip('^$')}")
ALIAS_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,62}")  # starts with a letter; versions start with their date
ABSENT = ("404", "NoSuchKey")  # S3 error codes: no object under the key (HEAD answers a bare 404)
TAKEN = ("PreconditionFailed",)  # a write with If-None-Match: * found an object under the key


class ModelStoreSettings(S3ClientSettings):
    """``MODEL_STORE`` and its timeout; the server (``S3_ENDPOINT_URL``, ``S3_REGION``) is the artifact store's."""

    # s3://bucket/prefix of the published versions and aliases; unset: no store (the local CHECKPOINT_DIR alone).
    model_store: str | None = None
    # Seconds to wait for the model store (connect, and each read of a download) before counting it unreachable.
    model_store_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0

    @field_validator("model_store", mode="before")
    @classmethod
    def _a_bucket_url(cls, value: Any) -> Any:
        if not value:
            return None  # MODEL_STORE= : no store
        store_location(str(value))  # raises ValueError, naming the expected form
        return value


def store_location(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket/prefix`` (the prefix without surrounding slashes, maybe empty)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"MODEL_STORE must be s3://bucket/prefix, not {url!r}")
    return parts.netloc, parts.path.strip("/")


class ModelStoreError(Exception):
    """Anything the model store refuses or cannot do; the message says what and where."""


class ModelStoreUnavailable(ModelStoreError):
    """The server could not be reached, or refused the request (its error code in the message)."""


class NotPublished(ModelStoreError):
    """No such version, or alias, in the store."""


class RecordConflict(ModelStoreError):
    """A version's record in the store differs from the one being published under the same name."""


class VerificationError(ModelStoreError):
    """A file does not match its sha256 (tampered, corrupt or cut short), or a manifest its integrity hash."""


@dataclass(frozen=True)
class StoredFile:
    """One file of a version: the sha256 of its bytes (hex, the blob's name) and its size in bytes."""

    sha256: str
    size: int


@dataclass(frozen=True)
class VersionRef:
    kind: str
    version: str


@dataclass(frozen=True)
class VersionRecord:
    """What the store holds of a version; everything but ``published_by``/``published_at`` is its content, equal
    for every publish of the same sealed folder."""

    kind: str
    version: str
    files: dict[str, StoredFile]  # file name in the version folder -> its blob
    manifest: dict[str, Any]  # manifest.json as written by facegen.model.checkpoints
    evaluation: dict[str, Any] | None  # evaluation.json, when the version has one
    card: dict[str, Any]  # model_card(...): the numbers a listing shows
    requires: tuple[VersionRef, ...]  # versions pulled with it (a diffusion version's VAE)
    published_by: str
    published_at: str  # ISO 8601, UTC

    @property
    def teacher(self) -> str | None:
        """The version a distilled student was distilled from (its manifest's ``distillation.teacher``); ``None``
        for a plain version."""
        distillation = self.manifest.get("distillation")
        return distillation.get("teacher") if isinstance(distillation, dict) else None

    def content(self) -> dict[str, Any]:
        """The record without who published it when: what two publishes of one version must agree on."""
        return {k: v for k, v in self.to_json().items() if k not in ("published_by", "published_at")}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: Any, where: str) -> VersionRecord:
        """The record of a ``versions/…`` object; :class:`ModelStoreError` naming ``where`` when malformed."""
        try:
            return cls(kind=raw["kind"], version=raw["version"],
                       files={name: StoredFile(str(f["sha256"]), int(f["size"])) for name, f in raw["files"].items()},
                       manifest=dict(raw["manifest"]), evaluation=raw["evaluation"], card=dict(raw["card"]),
                       requires=tuple(VersionRef(r["kind"], r["version"]) for r in raw["requires"]),
                       published_by=raw["published_by"], published_at=raw["published_at"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelStoreError(f"{where}: not a version record ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class AliasMove:
    """An alias pointed at ``version`` (from ``previous``, ``None`` for its first move) by ``by`` at ``at``."""

    alias: str
    version: str
    previous: str | None
    by: str
    at: str  # ISO 8601, UTC, microseconds

    @classmethod
    def from_json(cls, raw: Any, where: str) -> AliasMove:
        try:
            return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)})
        except (KeyError, TypeError) as exc:
            raise ModelStoreError(f"{where}: not an alias entry ({type(exc).__name__}: {exc})") from None


@dataclass
class PublishResult:
    """What a publish did: records written or found identical, and files uploaded or found in the store
    (``kind/version/file`` each)."""

    recorded: list[VersionRef] = dataclasses.field(default_factory=list)
    unchanged: list[VersionRef] = dataclasses.field(default_factory=list)
    uploaded: list[str] = dataclasses.field(default_factory=list)
    present: list[str] = dataclasses.field(default_factory=list)
    uploaded_bytes: int = 0


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (as ``facegen.model.checkpoints.sha256_file``)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(DOWNLOAD_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_integrity(manifest: Mapping[str, Any]) -> str:
    """The seal ``facegen.model.checkpoints.manifest_integrity`` writes: sha256 of the manifest's canonical JSON
    without its ``integrity`` field (a test checks both agree; this room may not import that one)."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_card(results: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers ``models`` and ``GET /models`` show, from a version's report (the ``evaluation`` entry of its
    evaluation record, or of its manifest's ``metrics``): ``split``, ``vae_psnr_db`` (dB), ``vae_attribute_agreement``
    (rate in [0, 1]) and, per sampler setting (``dpmpp-20-g5``), ``accuracy_<label>`` (rates in [0, 1]), ``kid``,
    ``fid`` and ``seconds_per_image``; those the report lacks are left out (``{}`` without a report)."""
    report = results.get("evaluation")
    if not isinstance(report, dict):
        return {}
    card: dict[str, Any] = {k: report[k] for k in ("split", "vae_psnr_db") if k in report}
    agreement = report.get("vae_attribute_agreement")
    if isinstance(agreement, dict) and "rate" in agreement:
        card["vae_attribute_agreement"] = agreement["rate"]
    settings = {row["setting"]: {k: v for k, v in row.items() if isinstance(v, int | float) and (
        k.startswith("accuracy_") or k in ("kid", "fid", "seconds_per_image"))}
        for row in report.get("settings") or () if isinstance(row, dict) and "setting" in row}
    if settings:
        card["settings"] = settings
    return card


def format_card(card: Mapping[str, Any]) -> str:
    """One line of a card's numbers for people (percentages, KID ×1000)."""
    parts = []
    if "vae_psnr_db" in card:
        parts.append(f"VAE PSNR {card['vae_psnr_db']:.2f} dB")
    if "vae_attribute_agreement" in card:
        parts.append(f"VAE agreement {100 * card['vae_attribute_agreement']:.2f}%")
    for setting, numbers in card.get("settings", {}).items():
        shown = [f"{k.removeprefix('accuracy_')} {100 * v:.1f}%" for k, v in numbers.items() if k.startswith("accuracy_")]
        shown += [f"KID×1000 {1000 * numbers['kid']:.1f}"] if "kid" in numbers else []
        shown += [f"FID {numbers['fid']:.1f}"] if "fid" in numbers else []
        parts.append(f"{setting}: " + ", ".join(shown))
    if not parts:
        return "-"
    return "; ".join(parts) + (f" ({card['split']} split)" if "split" in card else "")


def check_name(name: str, what: str, pattern: re.Pattern[str] = NAME_PATTERN) -> str:
    if not isinstance(name, str) or len(name) > fields.MAX_VERSION_LENGTH or not pattern.fullmatch(name):
        raise ModelStoreError(f"invalid {what} name {name!r} (expected {pattern.pattern})")
    return name


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def read_local_version(directory: Path, actor: str) -> VersionRecord:
    """Check a version folder as loading would (manifest integrity, every listed file's sha256, the evaluation
    record's manifest hash) and describe it as a record published by ``actor`` now."""
    manifest_path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelStoreError(f"{manifest_path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("integrity") != manifest_integrity(manifest):
        raise VerificationError(f"{manifest_path}: integrity hash does not match its content (edited or corrupt)")
    kind, version = manifest.get("kind"), manifest.get("version")
    if version != directory.name:
        raise ModelStoreError(f"{manifest_path}: version {version!r} is not its folder's name {directory.name!r}")
    check_name(kind, "kind")
    check_name(version, "version")
    listed = manifest.get("files") or {}
    names = [MANIFEST_FILE, *listed]
    evaluation = None
    if (directory / EVALUATION_FILE).is_file():
        names.append(EVALUATION_FILE)
        try:
            evaluation = json.loads((directory / EVALUATION_FILE).read_text())
        except ValueError as exc:
            raise ModelStoreError(f"{directory / EVALUATION_FILE}: not valid JSON ({exc})") from None
        if not isinstance(evaluation, dict) or evaluation.get("manifest_sha256") != sha256_file(manifest_path):
            raise ModelStoreError(f"{directory / EVALUATION_FILE}: recorded for another manifest than {manifest_path}")
    files = {}
    for name in names:
        path = directory / name
        if not path.is_file():
            raise ModelStoreError(f"{path}: listed in the manifest but missing")
        files[name] = StoredFile(sha256_file(path), path.stat().st_size)
        if name in listed and files[name].sha256 != listed[name]:
            raise VerificationError(f"{path}: sha256 {files[name].sha256} does not match the manifest's {listed[name]}")
    requires = (VersionRef("vae", check_name(manifest["vae_version"], "version")),) if manifest.get("vae_version") else ()
    results = {**manifest.get("metrics", {}), **((evaluation or {}).get("results") or {})}
    return VersionRecord(kind, version, files, manifest, evaluation, model_card(results), requires, actor, now_iso())


class ModelStore:
    """Published versions and aliases under ``s3://bucket/prefix`` (see the module docstring for the layout)."""

    def __init__(self, settings: ModelStoreSettings):
        if not settings.model_store:
            raise ValueError("MODEL_STORE is not set")
        self.bucket, prefix = store_location(settings.model_store)
        self.prefix = f"{prefix}/" if prefix else ""
        self.client = s3_client(settings, settings.model_store_timeout_s)

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    # ---- keys -----------------------------------------------------------------------------------------------
    def blob_key(self, sha256: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ModelStoreError(f"not a sha256: {sha256!r}")
        return f"{self.prefix}blobs/sha256/{sha256}"

    def record_key(self, kind: str, version: str) -> str:
        return f"{self.prefix}versions/{check_name(kind, 'kind')}/{check_name(version, 'version')}.json"

    def alias_key(self, name: str, part: str) -> str:
        return f"{self.prefix}aliases/{check_name(name, 'alias', ALIAS_PATTERN)}/{part}"

    # ---- publishing -----------------------------------------------------------------------------------------
    def publish(self, version_dir: str | Path, actor: str) -> PublishResult:
        """Upload a sealed version folder (and the VAE its manifest names, from ``<checkpoints>/vae/``): the
        blobs the store lacks, then the record. Refuses (:class:`RecordConflict`) before uploading anything when
        the store holds a different record under the version's name."""
        result = PublishResult()
        self._publish(Path(version_dir), actor, result)
        return result

    def _publish(self, directory: Path, actor: str, result: PublishResult) -> None:
        record = read_local_version(directory, actor)
        existing = self._find_record(record.kind, record.version)
        if existing is not None:
            self._refuse_conflict(existing, record)
        for needed in record.requires:
            needed_dir = directory.parent.parent / needed.kind / needed.version
            if not needed_dir.is_dir():
                raise ModelStoreError(f"{directory / MANIFEST_FILE} needs {needed.kind} {needed.version}, which is "
                                      f"not in {needed_dir.parent}")
            self._publish(needed_dir, actor, result)
        for name, stored in record.files.items():
            label = f"{record.kind}/{record.version}/{name}"
            if self._upload_blob(directory / name, stored):
                result.uploaded.append(label)
                result.uploaded_bytes += stored.size
            else:
                result.present.append(label)
        ref = VersionRef(record.kind, record.version)
        if existing is not None:
            result.unchanged.append(ref)
        elif self._put_json_once(self.record_key(record.kind, record.version), record.to_json()):
            result.recorded.append(ref)
        else:  # published by someone else meanwhile
            self._refuse_conflict(self.record(record.version, record.kind), record)
            result.unchanged.append(ref)

    def _refuse_conflict(self, existing: VersionRecord, record: VersionRecord) -> None:
        ours, theirs = record.content(), existing.content()
        differing = sorted(k for k in ours if ours[k] != theirs.get(k))
        if differing:
            raise RecordConflict(
                f"{record.kind} {record.version} is already in {self.location} (published by {existing.published_by}"
                f" at {existing.published_at}) with a different {', '.join(differing)}: a published version never "
                "changes; publish the change as a new version")

    def _upload_blob(self, path: Path, stored: StoredFile) -> bool:
        """Upload a file under its sha256 unless the store has it; whether it was uploaded (``False`` too when
        someone else uploaded it meanwhile: the same bytes, by their name)."""
        key = self.blob_key(stored.sha256)
        if self._exists(key):
            return False
        with path.open("rb") as body:
            return self._call("upload", key, self.client.put_object, unless=TAKEN, Bucket=self.bucket, Key=key,
                              Body=body, ContentLength=stored.size, IfNoneMatch="*",
                              ContentType="application/octet-stream") is not None

    # ---- reading --------------------------------------------------------------------------------------------
    def record(self, version: str, kind: str = SERVED_KIND) -> VersionRecord:
        """The record of a published version; :class:`NotPublished` when the store has none."""
        record = self._find_record(kind, version)
        if record is None:
            raise NotPublished(f"no {kind} version {version!r} in {self.location}")
        return record

    def versions(self) -> list[VersionRecord]:
        """Every published version's record, by kind, then oldest first (the manifests' ``created_at``)."""
        records = [self._read_record(key) for key in self._keys(f"{self.prefix}versions/") if key.endswith(".json")]
        return sorted(records, key=lambda r: (r.kind, str(r.manifest.get("created_at", "")), r.version))

    def _find_record(self, kind: str, version: str) -> VersionRecord | None:
        key = self.record_key(kind, version)
        raw = self._get_json(key)
        return None if raw is None else VersionRecord.from_json(raw, f"{self.location}{key}")

    def _read_record(self, key: str) -> VersionRecord:
        raw = self._get_json(key)
        if raw is None:
            raise ModelStoreUnavailable(f"s3://{self.bucket}/{key} vanished while the store was listed")
        return VersionRecord.from_json(raw, f"s3://{self.bucket}/{key}")

    # ---- aliases --------------------------------------------------------------------------------------------
    def set_alias(self, name: str, version: str, actor: str) -> AliasMove | None:
        """Point alias ``name`` at a published diffusion version: a history entry, then the pointer. ``None`` when
        it already points there (nothing written)."""
        check_name(name, "alias", ALIAS_PATTERN)
        self.record(version)  # NotPublished unless the store has it
        if self._find_record(SERVED_KIND, name) is not None:
            raise ModelStoreError(f"alias {name!r} would hide the version of that name")
        current = self._current(name)
        if current is not None and current.version == version:
            return None
        at = datetime.now(UTC)
        if current is not None:  # entries sort by time: never before the move they follow, whatever the clock
            at = max(at, datetime.fromisoformat(current.at) + timedelta(microseconds=1))
        move = AliasMove(name, version, current.version if current else None, actor, at.isoformat(timespec="microseconds"))
        entry = self.alias_key(name, f"history/{at.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex}.json")
        if not self._put_json_once(entry, dataclasses.asdict(move)):
            raise ModelStoreError(f"{self.location}{entry} exists: a history entry is never overwritten")
        self._put_json(self.alias_key(name, "current.json"), dataclasses.asdict(move))
        return move

    def aliases(self) -> dict[str, AliasMove]:
        """Every alias and the move that set it, by name."""
        found = {}
        for folder in self._keys(f"{self.prefix}aliases/", folders=True):  # one per alias, not per move
            current = self._current(folder.removeprefix(f"{self.prefix}aliases/").rstrip("/"))
            if current is not None:
                found[current.alias] = current
        return dict(sorted(found.items()))

    def alias_history(self, name: str) -> list[AliasMove]:
        """Every move of an alias, oldest first (``[]`` for an alias never set)."""
        keys = sorted(self._keys(self.alias_key(name, "history/")))
        return [AliasMove.from_json(self._get_json(key), f"s3://{self.bucket}/{key}") for key in keys]

    def resolve(self, name_or_version: str) -> str:
        """The diffusion version an alias points at, or the name itself when it is a published diffusion version."""
        if ALIAS_PATTERN.fullmatch(name_or_version):
            current = self._current(name_or_version)
            if current is not None:
                return current.version
        self.record(name_or_version)
        return name_or_version

    def _current(self, name: str) -> AliasMove | None:
        key = self.alias_key(name, "current.json")
        raw = self._get_json(key)
        return None if raw is None else AliasMove.from_json(raw, f"s3://{self.bucket}/{key}")

    # ---- pulling --------------------------------------------------------------------------------------------
    def pull(self, version: str, cache_dir: str | Path, kind: str = SERVED_KIND) -> Path:
        """The verified folder ``<cache_dir>/<kind>/<version>/`` (the versions it needs pulled first): checked when
        already there, else downloaded beside it, verified, and renamed into place."""
        record = self.record(version, kind)
        for needed in record.requires:
            self.pull(needed.version, cache_dir, needed.kind)
        target = Path(cache_dir) / kind / version
        if target.is_dir():
            verify_cached(target, record)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".pull-{version}-", dir=target.parent))
        try:
            self._download_version(record, staging)
            try:
                os.rename(staging, target)
            except OSError:
                if not target.is_dir():
                    raise
                verify_cached(target, record)  # another process pulled it meanwhile
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _download_version(self, record: VersionRecord, folder: Path) -> None:
        """Download and verify every file: the manifest by the record's hash and its seal, the others by the
        manifest's hashes (the evaluation record by the record's)."""
        where = f"{record.kind} {record.version}"
        if MANIFEST_FILE not in record.files:
            raise VerificationError(f"{where}: the record lists no {MANIFEST_FILE}")
        self._download(record.files[MANIFEST_FILE], folder / MANIFEST_FILE, f"{where}: {MANIFEST_FILE}")
        manifest = check_manifest(folder / MANIFEST_FILE, record)
        for name, stored in record.files.items():
            if name != MANIFEST_FILE:
                expected = StoredFile(manifest["files"].get(name, stored.sha256), stored.size)
                self._download(expected, folder / name, f"{where}: {name}")

    def _download(self, stored: StoredFile, path: Path, label: str) -> None:
        """Stream a blob into ``path``, hashing it; :class:`VerificationError` unless its bytes have the sha256."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self.blob_key(stored.sha256)
        digest, received, cut = hashlib.sha256(), 0, None
        response = self._call("download", key, self.client.get_object, unless=ABSENT, Bucket=self.bucket, Key=key)
        if response is None:
            raise VerificationError(f"{label}: the store has no blob {key} (incomplete store)")
        try:
            with path.open("wb") as out:
                for chunk in response["Body"].iter_chunks(DOWNLOAD_CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
        except (BotoCoreError, ClientError) as exc:
            cut = exc
        finally:
            response["Body"].close()
        actual = digest.hexdigest()
        if actual != stored.sha256 or received != stored.size:
            why = f"download cut short ({type(cut).__name__})" if cut else "the object was replaced or is corrupt"
            raise VerificationError(
                f"{label}: sha256 {actual} of the {received} bytes received does not match the manifest's "
                f"{stored.sha256} ({stored.size} bytes): {why}; nothing of it was kept")

    # ---- S3 -------------------------------------------------------------------------------------------------
    def _exists(self, key: str) -> bool:
        return self._call("look up", key, self.client.head_object, unless=ABSENT, Bucket=self.bucket,
                          Key=key) is not None

    def _get_json(self, key: str) -> Any:
        """The parsed JSON object at ``key``; ``None`` when there is none."""
        from botocore.exceptions import BotoCoreError

        response = self._call("download", key, self.client.get_object, unless=ABSENT, Bucket=self.bucket, Key=key)
        if response is None:
            return None
        try:
            body = response["Body"].read()
        except BotoCoreError as exc:
            raise self._unavailable("download", key, exc) from exc
        try:
            return json.loads(body)
        except ValueError:
            raise ModelStoreError(f"s3://{self.bucket}/{key}: not valid JSON") from None

    def _put_json(self, key: str, value: Any, **conditions: str) -> Any:
        return self._call("upload", key, self.client.put_object, unless=TAKEN, Bucket=self.bucket, Key=key,
                          Body=json.dumps(value, indent=1, sort_keys=True).encode(), ContentType="application/json",
                          **conditions)

    def _put_json_once(self, key: str, value: Any) -> bool:
        """Write ``key`` only where nothing is; whether it was written."""
        return self._put_json(key, value, IfNoneMatch="*") is not None

    def _keys(self, prefix: str, folders: bool = False) -> Iterator[str]:
        """Every key under ``prefix``, in key order; ``folders``: instead, every ``<prefix><name>/`` there."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, **({"Delimiter": "/"} if folders else {}))
            for page in pages:
                for item in page.get("CommonPrefixes" if folders else "Contents", ()):
                    yield item["Prefix" if folders else "Key"]
        except (BotoCoreError, ClientError) as exc:
            raise self._unavailable("list", prefix, exc) from exc

    def _call(self, action: str, key: str, method: Any, unless: tuple[str, ...] = (), **kwargs: Any) -> Any:
        """``method(**kwargs)``; ``None`` when the server answers with an error code of ``unless`` (``ABSENT``,
        ``TAKEN``), :class:`ModelStoreUnavailable` for any other failure."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(**kwargs)
        except ClientError as exc:
            if _code(exc) in unless:
                return None
            raise self._unavailable(action, key, exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(action, key, exc) from exc

    def _unavailable(self, action: str, key: str, exc: Exception) -> ModelStoreUnavailable:
        """The error for callers, which may reach API clients (a job's ``error``): the error's code or type, not
        its text, which names the endpoint; that goes to the log."""
        log.warning("model store: %s of s3://%s/%s failed: %s", action, self.bucket, key, exc)
        # botocore's ReadTimeoutError has a ``response`` attribute too, set to None
        reason = _code(exc) if getattr(exc, "response", None) else type(exc).__name__
        return ModelStoreUnavailable(f"model store: could not {action} s3://{self.bucket}/{key} ({reason})")


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def check_manifest(path: Path, record: VersionRecord) -> dict[str, Any]:
    """A version's ``manifest.json`` (its sha256 already checked) that is sealed and names the record's version and
    files, parsed; :class:`VerificationError` otherwise."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VerificationError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("integrity") != manifest_integrity(manifest):
        raise VerificationError(f"{path}: integrity hash does not match its content (edited or corrupt)")
    if (manifest.get("kind"), manifest.get("version")) != (record.kind, record.version):
        raise VerificationError(f"{path}: a manifest of {manifest.get('kind')} {manifest.get('version')}, not of "
                                f"{record.kind} {record.version}")
    missing = set(manifest.get("files", {})) - set(record.files)
    if missing:
        raise VerificationError(f"{path}: the record lacks the manifest's {sorted(missing)}")
    return manifest


def verify_cached(directory: Path, record: VersionRecord) -> None:
    """A version already in the cache: ``manifest.json`` as published, sealed, and every weight file by its hash
    (the evaluation record is not checked: numbers may be recorded beside a version later)."""
    manifest_path = directory / MANIFEST_FILE
    stored = record.files.get(MANIFEST_FILE)
    actual = sha256_file(manifest_path) if manifest_path.is_file() else "(missing)"
    if stored is None or actual != stored.sha256:
        raise VerificationError(f"{manifest_path}: sha256 {actual} does not match the store's "
                                f"{stored.sha256 if stored else '(none)'}: remove the folder to pull it again")
    manifest = check_manifest(manifest_path, record)
    for name, expected in manifest.get("files", {}).items():
        path = directory / name
        actual = sha256_file(path) if path.is_file() else "(missing)"
        if actual != expected:
            raise VerificationError(f"{path}: sha256 {actual} does not match the manifest's {expected}: remove "
                                    "the folder to pull it again")


def open_model_store(settings: ModelStoreSettings) -> ModelStore | None:
    """The store ``MODEL_STORE`` names; ``None`` when it is unset."""
    return ModelStore(settings) if settings.model_store else None
