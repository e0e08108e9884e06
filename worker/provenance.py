"""Provenance: the parameters that reproduce an image, carried inside every PNG the worker stores.

Each PNG (a job's grid and each image alone) holds a ``tEXt`` chunk ``spec.PROVENANCE_KEY`` (``"parameters"``)
with one JSON object: the model version and the sha256 of its weights, the VAE version and its sha256, the
sampler, steps and guidance scale actually used, the seed, ``index`` (the image's index in the seed's sequence;
for a grid the list of its images' indices), the attributes, the job id, the precision and device, and the
software version. An image of the student sampler also names the student that drew it (``student``, its version,
and ``student_sha256``); ``model`` stays the served version a request names, so a resubmission reaches the same
worker. ``python -m service.client reproduce FILE.png`` resubmits exactly these.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import Any

from facegen.contract.spec import PROVENANCE_KEY, EditSpec, JobSpec
from facegen.model.checkpoints import WEIGHTS_FILE

from .engine import Engine

PACKAGE = "facegen"


@cache
def software_version() -> str:
    """The installed facegen package's version (``"unknown"`` when run from a tree that is not installed)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ModelIdentity:
    """What names the served networks exactly: versions, weight hashes, and the precision they run in."""

    version: str
    sha256: str
    vae: str
    vae_sha256: str
    dtype: str
    device: str
    student: str | None = None  # the distilled student served beside the model, when it has one
    student_sha256: str | None = None

    @classmethod
    def of(cls, engine: Engine) -> ModelIdentity:
        model, student = engine.model, engine.student
        return cls(model.version, model.manifest.files[WEIGHTS_FILE], model.vae_manifest.version,
                   model.vae_manifest.files[WEIGHTS_FILE], str(engine.dtype).removeprefix("torch."),
                   engine.device.type, None if student is None else student.version,
                   None if student is None else student.manifest.files[WEIGHTS_FILE])


def parameters(job_id: str, spec: JobSpec, resolved: dict[str, Any], model: ModelIdentity,
               index: int | list[int]) -> dict[str, Any]:
    """The provenance record of one image (``index``: an int) or of a grid (``index``: its images' indices)."""
    return {
        "model": model.version,
        "model_sha256": model.sha256,
        "vae": model.vae,
        "vae_sha256": model.vae_sha256,
        "sampler": resolved["sampler"],
        "steps": resolved["steps"],
        "guidance_scale": resolved["guidance_scale"],
        "seed": spec.seed,
        "index": index,
        "attributes": spec.attributes,
        "job_id": job_id,
        "dtype": model.dtype,
        "device": model.device,
        "software": f"{PACKAGE} {software_version()}",
        **({"kind": "edit", "strength": spec.strength, "input_sha256": hashlib.sha256(spec.image).hexdigest()}
           if isinstance(spec, EditSpec) else {}),
        **({"student": resolved["student"], "student_sha256": model.student_sha256} if "student" in resolved else {}),
    }


def png_text(record: dict[str, Any]) -> dict[str, str]:
    """The PNG text chunks carrying ``record`` (ASCII JSON, so it fits a ``tEXt`` chunk)."""
    return {PROVENANCE_KEY: json.dumps(record, sort_keys=True)}
