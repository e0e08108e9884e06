"""``python -m service [--host H] [--port P] [--workers N]``: serve the API with uvicorn.

Refuses to start (exit code 2, one line) on an address other than loopback without API keys, unless
ALLOW_OPEN_API is set (service/tenancy.py), and while the environment sets a renamed setting
(``service.config.RENAMED_SETTINGS``). At most MAX_CONNECTIONS connections per process are served at once.

Defaults come from the settings (HOST, PORT, WORKERS, LOG_LEVEL; REDIS_URL etc. are read by the app). Refuses to
start (exit code 2, one line) when Redis refuses the credentials or the TLS set-up, may evict keys
(``REDIS_ALLOW_EVICTION``), or refuses the commands admission needs; an unreachable Redis is no reason not to
start (the API answers 503 until it is back).
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from facegen.contract.connection import credentials_problem, eviction_problem
from service import admission, redis_clients
from service.config import get_settings, renamed_settings_problem
from service.tenancy import open_api_problem


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m service", description="facegen HTTP API")
    parser.add_argument("--host", default=settings.host, help=f"bind address (default {settings.host})")
    parser.add_argument("--port", type=int, default=settings.port, help=f"port (default {settings.port})")
    parser.add_argument("--workers", type=int, default=settings.workers,
                        help=f"uvicorn worker processes (default {settings.workers})")
    parser.add_argument("--log-level", default=settings.log_level, help=f"(default {settings.log_level})")
    args = parser.parse_args(argv)
    open_problem = renamed_settings_problem(os.environ) or open_api_problem(args.host, settings)
    if open_problem is not None:
        print(f"service: {open_problem}", file=sys.stderr)
        return 2
    with redis_clients.connect(settings) as conn:
        problem = (credentials_problem(conn, settings) or eviction_problem(conn, settings)
                   or admission.replication_problem(conn, settings))
    if problem is not None:
        print(f"service: {problem}", file=sys.stderr)
        return 2
    uvicorn.run(
        "service.app:create_served_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        limit_concurrency=settings.max_connections + 1,  # uvicorn counts the connection a request came on
        proxy_headers=True,
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
