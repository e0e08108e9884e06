"""What someone with write access to Redis could plant in a job's hash: a pickle that, once unpickled, touches a
marker file (``pathlib.Path.touch``, resolved by the unpickler in whichever process reads it). A test plants it in
a job's ``data`` or ``meta`` field and checks that no facegen process ever creates the marker."""

from __future__ import annotations

import pickle
import zlib
from pathlib import Path

import redis
from rq.job import Job


class TouchWhenUnpickled:
    """Pickles to a call of ``Path(marker).touch()``: unpickling it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return Path.touch, (Path(self.marker),)


def plant_pickle(connection: redis.Redis, job_id: str, field: str, marker: Path) -> None:
    """Write the ``field`` (``"data"`` or ``"meta"``) of job ``job_id``'s hash with a pickle that creates
    ``marker`` when unpickled, shaped as RQ's pickle serializer would have stored that field (``data``: the
    zlib-compressed ``(function, instance, args, kwargs)``)."""
    payload = TouchWhenUnpickled(marker)
    if field == "data":
        stored = zlib.compress(pickle.dumps(("worker.jobs.generate", None, (payload,), {})))
    else:
        stored = pickle.dumps({"submitted_at": payload})
    assert connection.exists(Job.key_for(job_id)), f"no job {job_id}"
    connection.hset(Job.key_for(job_id), field, stored)
