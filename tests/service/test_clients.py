"""The API's Redis clients and the process set-up of `python -m service`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis
import redis.asyncio

from service import redis_clients
from tests.service.conftest import REPO


@pytest.mark.parametrize("args", [
    ("SET", "key", "välue", "EX", 60),
    ("HSET", b"rq:job:1", "data", b"\x00\xff\x10", "timeout", 900, "ratio", 0.1, "big", 2**70),
    ("EVAL", "return 1", 0, memoryview(b"view"), bytearray(b"array")),
    ("CONFIG GET", "maxmemory"),  # a two-word name goes out as two words
])
def test_async_client_packs_commands_like_redis_py(make_settings, args):
    client = redis_clients.connect_async(make_settings())
    packed = b"".join(client.connection_pool.make_connection().pack_command(*args))
    assert packed == b"".join(redis.asyncio.Connection().pack_command(*args))


def test_async_client_refuses_what_redis_py_refuses(make_settings):
    connection = redis_clients.connect_async(make_settings()).connection_pool.make_connection()
    with pytest.raises(redis.DataError):
        connection.pack_command("SET", "key", True)


def test_served_app_freezes_its_startup_heap(redis_url):
    probe = ("import gc; from service.app import create_served_app; create_served_app(); "
             "print(gc.get_freeze_count(), gc.get_threshold()[0])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "REDIS_URL": redis_url}).stdout
    frozen, youngest_threshold = map(int, out.split())
    assert frozen > 10_000 and youngest_threshold > 700  # 700: Python's default
