"""``make demo``: Redis (reused or started), one worker with the bundled demo model, the webhook delivery process
and the API.

Webhooks are signed with ``WEBHOOK_SECRET`` (a fresh one for the session, printed, unless it is set) and may reach
this machine's own receivers (``WEBHOOK_ALLOW_PRIVATE``, unless it is set).

Prints the playground URL once the API is ready. Ctrl-C (or SIGTERM, or the terminal closing) stops everything it
started: each process gets one SIGINT, so the worker finishes the job it holds, and Redis, when the demo started
it, stops after them; a second Ctrl-C kills what is left at once.
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
from scripts.redisctl import RedisServer, ensure_redis
from worker.settings import WorkerSettings

READY_TIMEOUT_S = 180
STOP_GRACE_S = 20
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, `kill`, the terminal closing


class Stop(Exception):
    """A stop signal reached the demo."""


class Shutdown:
    """The demo's signal handling: the first stop signal raises ``Stop`` in the main loop; any later one, while the
    processes are stopping, asks to kill what is left at once (``forced``) instead of interrupting the stop."""

    def __init__(self) -> None:
        self.forced = False
        # a signal the demo was started ignoring stays ignored (`nohup make demo` keeps running when its terminal closes)
        self.handled = [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]
        for signum in self.handled:
            signal.signal(signum, self.first)

    def first(self, signum: int, frame: object) -> None:
        for other in self.handled:
            signal.signal(other, self.again)
        raise Stop(signal.Signals(signum).name)

    def again(self, signum: int, frame: object) -> None:
        self.forced = True


def wait_ready(url: str, processes: dict[str, subprocess.Popen]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes.values()):
            return False
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def stop_all(processes: dict[str, subprocess.Popen], redis_server: RedisServer | None, shutdown: Shutdown) -> None:
    """SIGINT to every process the demo started (each runs in a session of its own, so this is the one SIGINT it
    gets: the worker finishes the job it holds and writes the result), then Redis once they have exited. What still
    runs after ``STOP_GRACE_S`` seconds, or after another stop signal, is killed with what it started."""
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    for name, process in processes.items():
        while process.poll() is None and not shutdown.forced and time.monotonic() < deadline:
            time.sleep(0.1)
        if process.poll() is None:
            print(f"[demo] killing the {name}", file=sys.stderr)
            os.killpg(process.pid, signal.SIGKILL)  # its group: it leads a session of its own
            process.wait()
    if redis_server:
        redis_server.stop()
    print("[demo] stopped", file=sys.stderr)


def main() -> int:
    shutdown = Shutdown()
    processes: dict[str, subprocess.Popen] = {}
    redis_server: RedisServer | None = None
    try:
        redis_url, redis_server = ensure_redis()
        env = {**os.environ, "REDIS_URL": redis_url}
        env.setdefault("WEBHOOK_SECRET", "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
        env.setdefault("WEBHOOK_ALLOW_PRIVATE", "true")  # the demo serves this machine: local receivers are fine
        port = env.setdefault("PORT", "8000")
        url = f"http://127.0.0.1:{port}"
        settings = WorkerSettings()
        commands = {"API": ["service", "--port", port], "webhook sender": ["service.webhooks"]}
        if list_versions(settings.checkpoint_dir, "diffusion"):
            commands["worker"] = ["worker"]
        else:
            print(f"[demo] no diffusion checkpoint under {settings.checkpoint_dir}: starting the API without a "
                  "worker (train one: see README, 'Reproduce the demo model')", file=sys.stderr)
        for name, command in commands.items():
            child_env = {**env, "WEBHOOK_METRICS_PORT": "0"} if name == "webhook sender" else env
            processes[name] = subprocess.Popen([sys.executable, "-m", *command], env=child_env,
                                               start_new_session=True)
        if wait_ready(url, processes):
            print(f"\n[demo] facegen is ready: open {url}/  (API docs: {url}/openapi.json; Ctrl-C stops)\n"
                  f"[demo] webhooks are signed with WEBHOOK_SECRET={env['WEBHOOK_SECRET']}\n", flush=True)
        else:
            print(f"[demo] not ready after {READY_TIMEOUT_S}s; see the logs above ({url}/readyz says why)",
                  file=sys.stderr)
        while all(p.poll() is None for p in processes.values()):
            time.sleep(0.5)
        exited = next(name for name, p in processes.items() if p.poll() is not None)
        print(f"[demo] the {exited} exited ({processes[exited].returncode}): stopping the rest", file=sys.stderr)
        return 1
    except Stop:
        return 0
    finally:
        stop_all(processes, redis_server, shutdown)


if __name__ == "__main__":
    sys.exit(main())
