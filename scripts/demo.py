"""``make demo``: Redis (reused or started), one worker with the bundled demo model, the webhook delivery process
and the API.

Webhooks are signed with ``WEBHOOK_SECRET`` (a fresh one for the session, printed, unless it is set) and may reach
this machine's own receivers (``WEBHOOK_ALLOW_PRIVATE``, unless it is set).

Prints the playground URL once the API is ready; Ctrl-C stops everything it started.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from facegen.model.checkpoints import list_versions
from scripts.redisctl import ensure_redis
from worker.settings import WorkerSettings

READY_TIMEOUT_S = 180


def wait_ready(url: str, processes: list[subprocess.Popen]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            return False
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def main() -> int:
    redis_url, redis_server = ensure_redis()
    env = {**os.environ, "REDIS_URL": redis_url}
    env.setdefault("WEBHOOK_SECRET", "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
    env.setdefault("WEBHOOK_ALLOW_PRIVATE", "true")  # the demo serves this machine: local receivers are fine
    port = env.setdefault("PORT", "8000")
    url = f"http://127.0.0.1:{port}"
    settings = WorkerSettings()
    processes: list[subprocess.Popen] = []
    if list_versions(settings.checkpoint_dir, "diffusion"):
        processes.append(subprocess.Popen([sys.executable, "-m", "worker"], env=env))
    else:
        print(f"[demo] no diffusion checkpoint under {settings.checkpoint_dir}: starting the API without a worker "
              "(train one: see README, 'Reproduce the demo model')", file=sys.stderr)
    processes.append(subprocess.Popen([sys.executable, "-m", "service.webhooks"], env={**env, "WEBHOOK_METRICS_PORT": "0"}))
    processes.append(subprocess.Popen([sys.executable, "-m", "service", "--port", port], env=env))
    try:
        if wait_ready(url, processes):
            print(f"\n[demo] facegen is ready: open {url}/  (API docs: {url}/openapi.json; Ctrl-C stops)\n"
                  f"[demo] webhooks are signed with WEBHOOK_SECRET={env['WEBHOOK_SECRET']}\n", flush=True)
        else:
            print(f"[demo] not ready after {READY_TIMEOUT_S}s; see the logs above ({url}/readyz says why)",
                  file=sys.stderr)
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        if redis_server:
            redis_server.stop()
        print("[demo] stopped", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
