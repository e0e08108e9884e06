"""``python -m service [--host H] [--port P] [--workers N]``: serve the API with uvicorn.

Defaults come from the settings (HOST, PORT, WORKERS, LOG_LEVEL; REDIS_URL etc. are read by the app).
"""

from __future__ import annotations

import argparse

import uvicorn

from service.config import get_settings


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m service", description="facegen HTTP API")
    parser.add_argument("--host", default=settings.host, help=f"bind address (default {settings.host})")
    parser.add_argument("--port", type=int, default=settings.port, help=f"port (default {settings.port})")
    parser.add_argument("--workers", type=int, default=settings.workers,
                        help=f"uvicorn worker processes (default {settings.workers})")
    parser.add_argument("--log-level", default=settings.log_level, help=f"(default {settings.log_level})")
    args = parser.parse_args(argv)
    uvicorn.run(
        "service.app:create_served_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        proxy_headers=True,
        server_header=False,
    )


if __name__ == "__main__":
    main()
