"""Versioned, self-describing checkpoints: ``<root>/<kind>/<version>/{model.safetensors, manifest.json}``.

The manifest (:mod:`facegen.model.manifest`, typed) holds everything needed to rebuild the network (configs), what it
was trained on, and the sha256 of every weight file, plus an ``integrity`` hash of the manifest itself. Loading verifies both and
refuses anything that does not match; weights are read with safetensors, never unpickled. A version never changes
once written: numbers measured later go to its evaluation record (``evaluation.json``) beside it. ``latest`` is the
manifest with the newest ``created_at``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .manifest import FORMAT_VERSION, KINDS, Manifest, ManifestError, Parent, parse_manifest

WEIGHTS_FILE = "model.safetensors"
READER_FILE = "reader.safetensors"  # a diffusion version's latent attribute reader, when it has one
MANIFEST_FILE = "manifest.json"
# Numbers measured after a version was sealed (``python -m training evaluate``), kept beside it, never in the manifest
EVALUATION_FILE = "evaluation.json"
LATEST = "latest"

# The checkpoints shipped in this repository (the demo model); the worker serves them unless told otherwise.
BUNDLED_CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated, tampered with or of the wrong kind."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    manifest: Manifest
    state_dict: dict[str, torch.Tensor]

    @property
    def version(self) -> str:
        return self.manifest.version


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_integrity(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the manifest without its ``integrity`` field."""
    body = {k: v for k, v in manifest.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def new_version() -> str:
    """``YYYYmmdd-HHMMSS-<6 hex>``: sortable by eye, unique without coordination (never parsed)."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _write_manifest(directory: Path, typed: Manifest) -> None:
    """Seal the manifest with its integrity hash and replace the file atomically."""
    manifest = {k: v for k, v in typed.to_dict().items() if k != "integrity"}
    manifest["integrity"] = manifest_integrity(manifest)
    tmp = directory / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST_FILE)


def save_checkpoint(root: str | Path, state_dict: dict[str, torch.Tensor], manifest: Manifest,
                    dtype: torch.dtype | None = None, version: str | None = None,
                    parts: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a new version of ``manifest.kind`` atomically (temp dir, then rename) and return its folder.

    ``manifest`` carries the configs and training facts; format, version, created_at and file hashes are set
    here. ``dtype`` casts floating-point weights (e.g. ``torch.float16`` for the bundled model). ``parts``: further
    safetensors files (file name -> state dict, e.g. ``READER_FILE``), written as given and hashed like the weights.
    """
    kind = manifest.kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    version = version or new_version()
    if version == LATEST or "/" in version:
        raise ValueError(f"invalid version name {version!r}")
    kind_dir = Path(root) / kind
    target = kind_dir / version
    if target.exists():
        raise CheckpointError(f"{target} exists: a checkpoint version is never overwritten")
    kind_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state_dict.items()}
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=kind_dir))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE))
        for name, part in (parts or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in part.items()}, str(staging / name))
        sealed = manifest.replace(format_version=FORMAT_VERSION, version=version,
                                  created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
                                  weights_dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch."),
                                  files={name: sha256_file(staging / name) for name in (WEIGHTS_FILE, *(parts or {}))})
        _write_manifest(staging, sealed)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_manifest(directory: Path) -> Manifest:
    """Parse and integrity-check ``manifest.json`` in a version folder (older formats migrated)."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: manifest not found")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("integrity") != manifest_integrity(manifest):
        raise CheckpointError(f"{path}: integrity hash does not match its content (edited or corrupt)")
    try:
        return parse_manifest(manifest)
    except ManifestError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def list_versions(root: str | Path, kind: str) -> list[Manifest]:
    """Manifests of every readable version of a kind, oldest first (by ``created_at``)."""
    kind_dir = Path(root) / kind
    if not kind_dir.is_dir():
        return []
    manifests = []
    for directory in kind_dir.iterdir():
        if directory.is_dir() and not directory.name.startswith("."):
            try:
                manifests.append(read_manifest(directory))
            except CheckpointError:
                continue  # listing skips broken versions; loading one by name reports why
    return sorted(manifests, key=lambda m: m.created_at)


def is_student(manifest: Manifest) -> bool:
    """Whether ``manifest`` is a distilled student's (a diffusion version with a ``distillation`` record)."""
    return getattr(manifest, "distillation", None) is not None


def resolve_version(root: str | Path, kind: str, version: str) -> Path:
    """Folder of ``version``, or for ``latest`` of the newest version that is no distilled student (a student
    exported after its teacher is no newer model: it is named, or served beside its teacher)."""
    if version == LATEST:
        versions = list_versions(root, kind)
        models = [m for m in versions if not is_student(m)]
        if not models:
            only = " (only distilled students)" if versions else ""
            raise CheckpointError(f"no {kind} checkpoints under {Path(root) / kind}{only}")
        version = models[-1].version
    if not version or "/" in version or version.startswith("."):
        raise CheckpointError(f"invalid checkpoint version {version!r}")
    directory = Path(root) / kind / version
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such {kind} checkpoint")
    return directory


def served_versions(root: str | Path, version: str) -> tuple[str, str | None]:
    """What a worker serves for diffusion ``version``: ``(model, student)``. ``latest`` is the newest plain version
    (a student exported later is no newer model); ``student`` is the newest version whose manifest's
    ``distillation.teacher`` is ``model``, ``None`` when there is none. Raises :class:`CheckpointError` when there
    is no plain version, or when ``version`` names a student (a worker serves a student beside its teacher)."""
    named = read_manifest(resolve_version(root, "diffusion", version))
    if is_student(named):
        raise CheckpointError(f"{version} is a distilled student: serve its teacher {named.distillation.teacher}, "
                              "beside which the newest student of it is served")
    version = named.version
    students = [m.version for m in list_versions(root, "diffusion")
                if is_student(m) and m.distillation.teacher == version]
    return version, students[-1] if students else None


def load_checkpoint(root: str | Path, kind: str, version: str = LATEST, device: str = "cpu") -> Checkpoint:
    """Verify and load a version: manifest integrity, kind, every file's sha256, then the safetensors data."""
    directory = resolve_version(root, kind, version)
    manifest = read_manifest(directory)
    if manifest.kind != kind:
        raise CheckpointError(f"{directory}: manifest kind {manifest.kind!r}, expected {kind!r}")
    files = manifest.files
    if WEIGHTS_FILE not in files:
        raise CheckpointError(f"{directory}: manifest lists no {WEIGHTS_FILE}")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: weight file missing")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"{path}: sha256 {actual[:12]}… does not match the manifest's {expected[:12]}… "
                                  "(corrupt, truncated or replaced)")
    try:
        state_dict = load_file(str(directory / WEIGHTS_FILE), device=device)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: unreadable ({exc})") from None
    return Checkpoint(directory, manifest, state_dict)


def load_part(checkpoint: Checkpoint, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict of a further file of a loaded version (``save_checkpoint``'s ``parts``; its hash was verified
    by :func:`load_checkpoint`)."""
    if name not in checkpoint.manifest.files:
        raise CheckpointError(f"{checkpoint.path}: manifest lists no {name}")
    try:
        return load_file(str(checkpoint.path / name), device=device)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{checkpoint.path / name}: unreadable ({exc})") from None


def read_evaluation(directory: str | Path) -> dict[str, Any]:
    """The evaluation record beside a version: ``{entry: results}`` (e.g. ``"evaluation"``, ``"tuning"``), ``{}``
    when it has none. Refused when the record names another version or another manifest than the folder's."""
    directory = Path(directory)
    path = directory / EVALUATION_FILE
    if not path.is_file():
        return {}
    manifest_hash = sha256_file(directory / MANIFEST_FILE)
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("manifest_sha256") != manifest_hash:
        raise CheckpointError(f"{path}: recorded for another manifest than {directory / MANIFEST_FILE}")
    return record["results"]


def record_evaluation(directory: str | Path, results: dict[str, Any]) -> dict[str, Any]:
    """Merge ``results`` (``{entry: results}``) into the evaluation record beside a version, replaced atomically.
    The sealed manifest and the weights stay byte for byte as they were: a version never changes once written."""
    directory = Path(directory)
    read_manifest(directory)  # only a sound version gets a record
    merged = read_evaluation(directory) | results
    record = {"version": directory.name, "manifest_sha256": sha256_file(directory / MANIFEST_FILE),
              "results": merged}
    tmp = directory / (EVALUATION_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / EVALUATION_FILE)
    return merged


def derive_checkpoint(root: str | Path, kind: str, version: str,
                      weights: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
                      parts: dict[str, dict[str, torch.Tensor]] | None = None, **changes: Any) -> Path:
    """A new version with ``version``'s weights (bit for bit, or as ``weights`` maps its state dict) and its
    manifest's fields replaced by ``changes`` (e.g. ``sampling=SamplingConfig(...)``), recording ``derived_from``;
    its further files come along, and ``parts`` adds or replaces some. The original version is left as it was."""
    source = load_checkpoint(root, kind, version)
    state = source.state_dict if weights is None else weights(source.state_dict)
    kept = {name: load_part(source, name) for name in source.manifest.files if name != WEIGHTS_FILE}
    return save_checkpoint(root, state, source.manifest.replace(**changes, derived_from=source.version),
                           parts=kept | (parts or {}))


def shared_parts(root: str | Path, vae_a: str, vae_b: str) -> tuple[str, ...]:
    """The halves two VAE versions share, of ``("encoder", "decoder")``: their weights are equal in value (the same
    encoder maps images to the same latents; the same decoder draws every latent as the same image). Training loads
    weights as float32, so a fine-tune of the other half of a version stored in float16 and exported in float32
    shares this half (every float16 value is exact in float32); the other way round rounds it, and differs."""
    a, b = (load_checkpoint(root, "vae", version).state_dict for version in (vae_a, vae_b))

    def same(part: str) -> bool:
        names = sorted(name for name in a if name.startswith(f"{part}."))
        return bool(names) and names == sorted(name for name in b if name.startswith(f"{part}.")) and all(
            torch.equal(a[name].float(), b[name].float()) for name in names)

    return tuple(part for part in ("encoder", "decoder") if same(part))


def warm_start(root: str | Path, kind: str, version: str) -> tuple[Checkpoint, Parent]:
    """An exported version to start a new training run from: the verified checkpoint (weights as float32) and the
    :class:`Parent` record of the lineage (every ancestor version, oldest first, ending with this one)."""
    source = load_checkpoint(root, kind, version)
    state = {name: value.float() if value.is_floating_point() else value for name, value in source.state_dict.items()}
    grandparent = source.manifest.training.init_from
    parent = Parent(source.version, source.manifest.files[WEIGHTS_FILE],
                    (*(grandparent.lineage if grandparent else ()), source.version))
    return Checkpoint(source.path, source.manifest, state), parent
