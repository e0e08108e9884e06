"""The checkpoint manifest as frozen, typed dataclasses: readers use attributes, never string keys.

``manifest.json`` stays plain JSON on disk (sealed by ``facegen.model.checkpoints``); :func:`parse_manifest` turns it
into a :class:`VAEManifest` or :class:`DiffusionManifest`, migrating older ``format_version`` layouts first, and
``to_dict`` writes it back. The configs inside are the same dataclasses the trainers use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import (
    DISTILLATION_METHODS,
    ConsistencyConfig,
    DataConfig,
    DiffusionTrainConfig,
    DistillConfig,
    ReaderConfig,
    SamplingConfig,
    ScheduleConfig,
    UNetConfig,
    VAEConfig,
    VAETrainConfig,
    asdict,
    from_dict,
)

FORMAT_VERSION = 2
KINDS = ("vae", "diffusion")


class ManifestError(ValueError):
    """A manifest misses a field, has one of the wrong shape, or comes from an unknown format."""


@dataclass(frozen=True)
class Parent:
    """The exported version a training run started from (``--init-from``), and its whole ancestry."""

    version: str
    weights_sha256: str
    lineage: tuple[str, ...]  # every ancestor version, oldest first, ending with ``version``


@dataclass(frozen=True)
class TrainingRun:
    """Facts of the run that produced the weights."""

    config: VAETrainConfig | DiffusionTrainConfig | DistillConfig
    steps: int
    examples: int  # training images (VAE), latents (diffusion, mirrors included) or teacher chains (student)
    precision: str
    world_size: int
    device: str
    weights: str = "trained"  # "trained" or "ema" (the diffusion and student exports are EMAs)
    landmarks: bool = False  # the VAE loss weighed eyes and mouth from the landmark file
    init_from: Parent | None = None


@dataclass(frozen=True)
class Distillation:
    """A few-step student's origin and sampling: distilled from ``teacher`` (warm-started from its weights or from
    an earlier student of it, ``training.init_from``) by ``method``; sampled by
    ``facegen.model.diffusion.consistency`` in ``1..sampling.max_steps`` steps, one network row each, the guidance
    scale an input of the network."""

    teacher: str
    method: str
    sampling: ConsistencyConfig


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What every version records; the seal (``files``, ``integrity``) is written by ``save_checkpoint``."""

    kind: str
    version: str = ""
    created_at: str = ""
    format_version: int = FORMAT_VERSION
    weights_dtype: str = ""
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    integrity: str = ""
    attributes: tuple[str, ...]
    data: DataConfig
    dataset_fingerprint: str
    training: TrainingRun
    metrics: dict[str, Any] = field(default_factory=dict)
    derived_from: str | None = None  # the version whose weights a derived version copies bit for bit

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (configs as dicts, tuples as lists, no None-valued optional fields)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name in ("version", "created_at", "weights_dtype", "integrity") and not value):
                continue
            out[f.name] = asdict(value) if dataclasses.is_dataclass(value) else value
        return _jsonable(out)

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class VAEManifest(Manifest):
    kind: str = "vae"
    model: VAEConfig


@dataclass(frozen=True, kw_only=True)
class DiffusionManifest(Manifest):
    kind: str = "diffusion"
    model: UNetConfig
    schedule: ScheduleConfig
    sampling: SamplingConfig
    vae_version: str
    latent_scale: float  # z_model = latent_scale * z_vae
    latent_clip: float  # max |z_model| seen in training: the samplers clamp x0 predictions to it
    latent_shape: tuple[int, int, int]  # [C, H, W] of the model's latents
    image_size: int
    reader: ReaderConfig | None = None  # the latent attribute reader in ``READER_FILE``, when the version has one
    distillation: Distillation | None = None  # a distilled student's teacher, method and step counts


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """Bring an older layout up to ``FORMAT_VERSION`` (format 1: ``train_images`` / ``train_latents``)."""
    version = raw.get("format_version")
    if version == FORMAT_VERSION:
        return raw
    if version != 1:
        raise ManifestError(f"format_version {version!r} is not one this code reads (1 or {FORMAT_VERSION})")
    training = dict(raw.get("training") or {})
    examples = training.pop("train_images", None) or training.pop("train_latents", None)
    training["examples"] = int(examples or 0)
    training.setdefault("weights", "trained")
    # format 1 runs that predate these losses did not record them: they were off, not today's defaults
    absent_means_off = {"landmark_weight": 0.0} if raw.get("kind") == "vae" else {"min_snr_gamma": 0.0}
    training["config"] = {**absent_means_off, **training.get("config", {})}
    return {**raw, "training": training, "format_version": FORMAT_VERSION}


def _training(raw: dict[str, Any], config_class: type) -> TrainingRun:
    values = dict(raw)
    parent = values.pop("init_from", None)
    config = from_dict(config_class, values.pop("config"))
    return dataclasses.replace(from_dict(TrainingRun, values | {"config": config}),
                               init_from=from_dict(Parent, parent) if parent else None)


def _distillation(raw: dict[str, Any]) -> Distillation:
    if raw["method"] not in DISTILLATION_METHODS:
        raise ManifestError(f"distillation method {raw['method']!r} is not one of {DISTILLATION_METHODS}")
    return Distillation(raw["teacher"], raw["method"], from_dict(ConsistencyConfig, raw["sampling"]))


def parse_manifest(raw: dict[str, Any]) -> VAEManifest | DiffusionManifest:
    """The typed manifest of a ``manifest.json`` dict (any known format version)."""
    try:
        raw = _migrate(raw)
        distillation = _distillation(raw["distillation"]) if raw.get("distillation") else None
        config_class = (VAETrainConfig if raw["kind"] == "vae" else DistillConfig if distillation
                        else DiffusionTrainConfig)
        common = {k: raw[k] for k in ("kind", "version", "created_at", "format_version", "weights_dtype", "files",
                                      "integrity", "dataset_fingerprint") if k in raw}
        common |= {"attributes": tuple(raw["attributes"]), "data": from_dict(DataConfig, raw["data"]),
                   "training": _training(raw["training"], config_class), "metrics": raw.get("metrics", {}),
                   "derived_from": raw.get("derived_from")}
        if raw["kind"] == "vae":
            return VAEManifest(**common, model=from_dict(VAEConfig, raw["model"]))
        if raw["kind"] == "diffusion":
            return DiffusionManifest(
                **common, model=from_dict(UNetConfig, raw["model"]), schedule=from_dict(ScheduleConfig, raw["schedule"]),
                sampling=from_dict(SamplingConfig, raw["sampling"]), vae_version=raw["vae_version"],
                latent_scale=float(raw["latent_scale"]), latent_clip=float(raw["latent_clip"]),
                latent_shape=tuple(raw["latent_shape"]), image_size=int(raw["image_size"]),
                reader=from_dict(ReaderConfig, raw["reader"]) if raw.get("reader") else None,
                distillation=distillation)
        raise ManifestError(f"kind {raw['kind']!r} is not one of {KINDS}")
    except KeyError as exc:
        raise ManifestError(f"manifest misses the field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"malformed manifest: {exc}") from None
