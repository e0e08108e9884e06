"""API alone: enqueue throughput and latency of ``POST /generate`` at ``--clients`` concurrent connections, with
``wrk`` (Debian package) as the load generator against ``python -m service`` under uvicorn, Redis on loopback.

    python -m bench.api_load --clients 64 --seconds 10 --workers 1,2

No GPU worker runs: jobs pile up in the queue (the cap is lifted), and afterwards the queue length is checked
against the number of 202 answers, so every counted request really enqueued a job. A warm-up run
(``--warmup-seconds``, its jobs then flushed) comes first, so the figures are the steady state's.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import redis

from bench.common import markdown_table, save
from bench.stack import start_api, start_redis
from facegen.contract.spec import DEFAULT_QUEUE

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"label": "smiling", "count": 1, "seed": 7}'
wrk.headers["Content-Type"] = "application/json"
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests, errors, requests/s and latency percentiles (ms) from ``wrk --latency`` output."""
    def ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
        return float(value) * UNITS[unit]

    percentiles = {f"p{p}": ms(v) for p, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)$", output, re.MULTILINE)}
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    return {
        "requests": int(re.search(r"(\d+) requests in", output).group(1)),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),
        **percentiles,
    }


def run_wrk(url: str, script: Path, threads: int, clients: int, seconds: int) -> str:
    """``wrk --latency`` output of ``seconds`` of load on ``url`` (request from the Lua ``script``)."""
    return subprocess.run(["wrk", "-t", str(threads), "-c", str(clients), "-d", f"{seconds}s", "--latency",
                           "-s", str(script), url], capture_output=True, text=True, check=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup-seconds", type=int, default=3, help="load before the measured run, not counted")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--workers", default="1,2", help="uvicorn worker processes to compare")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")

    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(WRK_SCRIPT)
    server = start_redis()
    conn = redis.Redis.from_url(server.url)
    records, rows = [], []
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            conn.flushdb()
            api, url = start_api(server.url, workers=workers, MAX_QUEUED="100000000")
            try:
                # Warm-up first: connections opened, pools filled, first-call work done.
                run_wrk(f"{url}/generate", script, args.threads, args.clients, args.warmup_seconds)
                conn.flushdb()
                output = run_wrk(f"{url}/generate", script, args.threads, args.clients, args.seconds)
            finally:
                api.stop()
            result = parse_wrk(output)
            result["jobs_in_queue"] = conn.llen(f"rq:queue:{DEFAULT_QUEUE}")
            result |= {"uvicorn_workers": workers, "clients": args.clients, "seconds": args.seconds}
            # wrk stops counting with up to --clients requests in flight; those still enqueue their job.
            accepted = result["requests"] - result["non_2xx"]
            if not accepted <= result["jobs_in_queue"] <= accepted + args.clients:
                print(f"warning: {accepted} requests answered 202 but {result['jobs_in_queue']} jobs are queued")
            records.append(result)
            rows.append([workers, args.clients, result["requests_per_s"], result["p50"], result["p90"],
                         result["p99"], result["non_2xx"], result["jobs_in_queue"]])
            print(output, flush=True)
    finally:
        server.stop()
    table = markdown_table(["uvicorn workers", "clients", "requests/s", "p50 ms", "p90 ms", "p99 ms", "non-2xx",
                            "jobs queued"], rows)
    save("api_load", {"results": records}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
