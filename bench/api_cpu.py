"""CPU cost of one ``POST /generate`` inside the app: the ASGI app is called in-process (no HTTP server, no
sockets to the client) with ``--concurrency`` requests in flight, against a private Redis, and the process's CPU
time is divided by the number of requests. This is the figure the API's request-path work moves; ``api_load``
measures the same path through uvicorn and wrk.

    python -m bench.api_cpu --requests 12000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import redis
import uvloop

from bench.common import markdown_table, save
from bench.stack import start_redis
from facegen.contract.spec import DEFAULT_QUEUE
from service.app import create_app
from service.config import Settings

BODY = b'{"label": "smiling", "count": 1, "seed": 7}'


async def post_generate(app: Any) -> int:
    """One ``POST /generate`` through the ASGI app; returns the status code."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/generate", "raw_path": b"/generate", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(BODY)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    body_sent, status = False, 0

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if body_sent:  # the app only asks again to watch for a disconnect
            await asyncio.Event().wait()
        body_sent = True
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def measure(redis_url: str, requests: int, concurrency: int) -> dict[str, float]:
    app = create_app(Settings(redis_url=redis_url, max_queued=10**9))
    conn = redis.Redis.from_url(redis_url)
    per_task = requests // concurrency

    async def client(count: int) -> None:
        for _ in range(count):
            status = await post_generate(app)
            if status != 202:
                raise RuntimeError(f"POST /generate answered {status}")

    await client(200)  # warm-up: connections, first-call work
    conn.flushdb()
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(per_task) for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    done = per_task * concurrency
    queued = conn.llen(f"rq:queue:{DEFAULT_QUEUE}")
    conn.close()
    if queued != done:
        raise RuntimeError(f"{done} requests answered 202 but {queued} jobs are queued")
    return {"requests": done, "cpu_us_per_request": 1e6 * cpu / done, "requests_per_s": done / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    server = start_redis()
    try:
        result = uvloop.run(measure(server.url, args.requests, args.concurrency))  # uvicorn's loop too
    finally:
        server.stop()
    table = markdown_table(["requests", "in flight", "CPU µs / request", "requests/s (one process, no HTTP)"],
                           [[result["requests"], args.concurrency, result["cpu_us_per_request"],
                             result["requests_per_s"]]])
    save("api_cpu", {"concurrency": args.concurrency, **result}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
