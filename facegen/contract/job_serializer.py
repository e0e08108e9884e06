"""How every facegen process stores RQ jobs in Redis: JSON, never pickle.

RQ's default serializer is pickle, so whoever can write a job hash in Redis would run code in each process that
reads it (the API, the workers with their store credentials, the webhook sender with its signing secret). Every
``Queue``, ``Job.fetch``, registry and worker of ours passes :data:`JOB_SERIALIZER` instead: a job's data (function
name, arguments), meta and result are JSON text, and bytes that are not JSON raise :class:`UnreadableJobData`
(a ``ValueError``) instead of being interpreted. RQ turns an unreadable ``data`` into its ``DeserializationError``
and keeps an unreadable ``meta`` aside (``job.meta == {"unserialized": ...}``); :func:`unreadable_part` tells a
reader which part of a fetched job could not be read, and :func:`refusal` is the one-line reason such a job ends
failed with, in the worker, in the webhook sender and as the API shows it.

Imports no torch and no FastAPI: the API process uses it as it uses :mod:`facegen.contract.spec`.
"""

from __future__ import annotations

import json
from typing import Any

from rq.exceptions import DeserializationError
from rq.job import Job


class UnreadableJobData(ValueError):
    """Bytes stored for a job that are not UTF-8 JSON (pickle, a truncated write, anything else)."""


class JsonJobSerializer:
    """RQ's serializer protocol (``dumps``/``loads``) over strict JSON: UTF-8, no NaN or infinity."""

    @staticmethod
    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()

    @staticmethod
    def loads(data: bytes | str) -> Any:
        try:
            return json.loads(data, parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise UnreadableJobData(f"not JSON ({type(exc).__name__})") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


JOB_SERIALIZER = JsonJobSerializer


def unreadable_part(job: Job) -> str | None:
    """``"data"`` or ``"meta"`` when that part of ``job`` (fetched with :data:`JOB_SERIALIZER`) is not JSON, else
    ``None``. Reading ``data`` only parses it; nothing in it is ever imported or called here."""
    if set(job.meta) == {"unserialized"}:  # how RQ keeps a meta its serializer refused
        return "meta"
    try:
        job.func_name  # noqa: B018 - parses the stored data (RQ deserializes it lazily)
    except DeserializationError:
        return "data"
    return None


def refusal(part: str) -> str:
    """The reason a job whose ``part`` (``"data"`` or ``"meta"``, see :func:`unreadable_part`) is not JSON ends
    failed with: one line, e.g. ``"job data is not JSON: refused"``."""
    return f"job {part} is not JSON: refused"
