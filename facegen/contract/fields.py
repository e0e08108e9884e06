"""The fields of a job request, each type and bound defined once: the job spec (spec.py) is built from them, the API's
request schemas (service/schemas.py, POST /generate's JSON body and POST /edit's form) reuse them, and the worker
checks a job by parsing its spec. Pydantic ``Annotated`` types carry the bounds; a use site adds only its
description and its default. Torch-free, FastAPI-free.
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated

from pydantic import AfterValidator, Field

# ----- bounds and defaults ------------------------------------------------------------------------------------
MAX_COUNT = 64
DEFAULT_COUNT = 4
MAX_STEPS = 1000
# A distilled student samples in 1..MAX_STUDENT_STEPS steps (one network row each); a student's manifest may allow
# fewer (GET /models: `student.max_steps`).
MAX_STUDENT_STEPS = 8
MAX_GUIDANCE = 20.0
MAX_SEED = 2**63 - 1
# Seeds the API draws itself stay below 2**53 so that JavaScript clients (the playground) read them exactly.
MAX_RANDOM_SEED = 2**53 - 1
MAX_ANIMATION_FRAMES = 64
DEFAULT_ANIMATION_FRAMES = 16
MAX_ANIMATION_FPS = 30
DEFAULT_ANIMATION_FPS = 8
# Attribute transitions: frames per image (each a full denoising chain), and the chains a job may ask for in all
# (count x transition_frames), the same bound as a plain job's images.
MAX_TRANSITION_FRAMES = 16
DEFAULT_TRANSITION_FRAMES = 8
MAX_TRANSITION_CHAINS = MAX_COUNT
MAX_FIRST_INDEX = 2**31 - 1
MAX_ATTRIBUTES = 40  # attributes one condition may name
MAX_ATTRIBUTE_NAME_LENGTH = 40
MAX_LABEL_LENGTH = 64
MAX_VERSION_LENGTH = 64
MODEL_VERSION_PATTERN = r"^[A-Za-z0-9._-]+$"
# The version name facegen.model.checkpoints resolves to the newest; repeated here because this module stays torch-free
# (tests/worker/test_contract.py checks the two agree).
LATEST = "latest"
# An edit's depth into the noise when the request leaves it out: the strength of the pair that spec.DEFAULT_EDIT_GUIDANCE
# describes.
DEFAULT_EDIT_STRENGTH = 0.6

_ATTRIBUTE_NAME = re.compile(rf"[A-Za-z0-9_]{{1,{MAX_ATTRIBUTE_NAME_LENGTH}}}")


def draw_seed() -> int:
    """The seed of a request that gives none: uniform in ``[0, MAX_RANDOM_SEED]``."""
    return secrets.randbelow(MAX_RANDOM_SEED + 1)


def normalise_label(value: str) -> str:
    """Labels are case-insensitive and may carry surrounding blanks: ``" Not_Smiling "`` -> ``"not_smiling"``."""
    return value.strip().lower()


def _plain_attribute_names(value: dict[str, bool]) -> dict[str, bool]:
    for name in value:
        if not _ATTRIBUTE_NAME.fullmatch(name):
            raise ValueError(f"attribute name {name!r} must be 1-{MAX_ATTRIBUTE_NAME_LENGTH} letters, digits or "
                             "underscores")
    return value


# ----- types --------------------------------------------------------------------------------------------------
# One label ("smiling", "not_smiling"), normalised; the API resolves it to attributes against the live models.
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_LENGTH), AfterValidator(normalise_label)]
# A condition as a request gives it: attribute name -> wanted (the API resolves the names, case-insensitive).
AttributeMap = Annotated[dict[str, bool], Field(min_length=1, max_length=MAX_ATTRIBUTES)]
# A condition as a job spec carries it: the model's own attribute names.
ResolvedAttributeMap = Annotated[AttributeMap, AfterValidator(_plain_attribute_names)]
Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
GuidanceScale = Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)]
AnimationFrames = Annotated[int, Field(ge=2, le=MAX_ANIMATION_FRAMES)]
AnimationFps = Annotated[int, Field(ge=1, le=MAX_ANIMATION_FPS)]
TransitionFrames = Annotated[int, Field(ge=2, le=MAX_TRANSITION_FRAMES)]
# image k of a job is image first_index + k of its seed (noise stream (seed, first_index + k))
FirstIndex = Annotated[int, Field(ge=0, le=MAX_FIRST_INDEX)]
ModelVersion = Annotated[str, Field(min_length=1, max_length=MAX_VERSION_LENGTH, pattern=MODEL_VERSION_PATTERN)]
# An edit's depth into the noise: 0 = the VAE round trip of the input, 1 = regenerated from pure noise.
Strength = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
