"""End to end through the API: ``--clients`` concurrent ``count=1`` requests with cross-request batching
(``MAX_BATCH=32``, without and with a ``BATCH_WINDOW_MS``) against ``MAX_BATCH=1``; and what one job costs beyond its
own sampling once the model is loaded. Real processes: a private Redis, ``python -m service``, ``python -m worker`` (bundled model).

    python -m bench.api_e2e --clients 32
"""

from __future__ import annotations

import argparse
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench.common import markdown_table, save
from bench.stack import start_api, start_redis, start_worker
from scripts.redisctl import free_port

POLL_S = 0.02  # while timing one job
BURST_POLL_S = 0.2  # while 32 jobs run: the poller must not take CPU from the worker on a small machine


def submit(url: str, seed: int, client: httpx.Client | None = None) -> str:
    body = {"label": ("smiling", "not_smiling")[seed % 2], "count": 1, "seed": seed}
    response = (client or httpx).post(f"{url}/generate", json=body, timeout=30)
    response.raise_for_status()
    return response.json()["job_id"]


def wait_finished(url: str, job_id: str, timeout: float = 1800, poll_s: float = POLL_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()["status"]
        if status == "finished":
            return
        if status in ("failed", "canceled", "stopped") or time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} ended {status}")
        time.sleep(poll_s)


def burst(url: str, clients: int) -> float:
    """Seconds from the first of ``clients`` simultaneous requests to the last job finished."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(limits=limits) as client, ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        job_ids = list(pool.map(lambda seed: submit(url, seed, client), range(clients)))
    for job_id in job_ids:  # one poller, in submission order: the polling itself must not load the machine
        wait_finished(url, job_id, poll_s=BURST_POLL_S)
    elapsed = time.perf_counter() - start
    assert all(httpx.get(f"{url}/jobs/{j}/result", timeout=30).status_code == 200 for j in job_ids)
    return elapsed


def engine_seconds(metrics_url: str) -> float:
    """Total sampling + decoding seconds the worker has reported (its batch_seconds histogram sum)."""
    text = httpx.get(metrics_url, timeout=10).text
    return float(re.search(r"^facegen_worker_batch_seconds_sum (\S+)$", text, re.MULTILINE).group(1))


def single_job_overhead(url: str, metrics_url: str) -> dict[str, float]:
    """A second job on a warm worker: client-seen latency, the worker's sampling + decoding, and the rest."""
    before = engine_seconds(metrics_url)
    start = time.perf_counter()
    wait_finished(url, submit(url, 1001))
    latency = time.perf_counter() - start
    engine = engine_seconds(metrics_url) - before
    return {"latency_s": latency, "engine_s": engine, "overhead_s": latency - engine}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--batched", type=int, default=32, help="MAX_BATCH of the batching worker")
    parser.add_argument("--window-ms", type=int, default=100, help="BATCH_WINDOW_MS of the second batching run")
    args = parser.parse_args(argv)

    configs = [(args.batched, 0), (args.batched, args.window_ms), (1, 0)]
    server = start_redis()
    api, url = start_api(server.url)
    records, rows = {}, []
    try:
        for max_batch, window in configs:
            metrics_port = free_port()
            worker, startup_s = start_worker(server.url, MAX_BATCH=str(max_batch), BATCH_WINDOW_MS=str(window),
                                             METRICS_PORT=str(metrics_port))
            try:
                metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
                wait_finished(url, submit(url, 1000))  # first job: allocator and kernels warm up
                overhead = single_job_overhead(url, metrics_url)
                wall = burst(url, args.clients)
            finally:
                worker.stop()
            records[f"max_batch_{max_batch}_window_{window}"] = {
                "max_batch": max_batch, "batch_window_ms": window, "wall_s": wall, "images_per_s": args.clients / wall,
                "worker_startup_s": startup_s, **overhead}
            rows.append([max_batch, window, args.clients, wall, args.clients / wall, startup_s, overhead["latency_s"],
                         overhead["engine_s"], overhead["overhead_s"]])
            print(rows[-1], flush=True)
    finally:
        api.stop()
        server.stop()
    unbatched = records["max_batch_1_window_0"]["images_per_s"]
    speedups = {name: record["images_per_s"] / unbatched for name, record in records.items()}
    table = markdown_table(["MAX_BATCH", "BATCH_WINDOW_MS", "concurrent requests", "wall s", "images/s",
                            "worker start-up s", "one job: latency s", "sampling+decode s", "overhead s"], rows)
    table += "\n\nCross-request batching speed-up over MAX_BATCH=1 (images/s): " + ", ".join(
        f"MAX_BATCH={records[n]['max_batch']} BATCH_WINDOW_MS={records[n]['batch_window_ms']}: **{v:.2f}x**"
        for n, v in speedups.items() if records[n]["max_batch"] > 1)
    save("api_e2e", {"clients": args.clients, "speedups": speedups, "results": records}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
