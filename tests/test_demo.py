"""`make demo`, the README's first command, as a user runs it: ``python -m scripts.demo`` in a session of its own, as
a terminal runs it, with the bundled model. It serves generations over HTTP; Ctrl-C (SIGINT to its process group)
or SIGTERM stops every process it started, lets the worker finish the job it holds, stops Redis when it started it
and no other; a second Ctrl-C kills what is left at once; under nohup a hangup changes nothing. No traceback."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image
from rq.job import Job

from scripts.processes import free_ports
from scripts.redisctl import RedisServer, reachable
from tests.reliability.conftest import job_state, wait_for

REPO = Path(__file__).resolve().parents[1]
READY_S = 240
# settings a test run may carry that would change what the demo serves
FOREIGN_SETTINGS = ("API_KEYS", "ARTIFACT_STORE", "MODEL_STORE", "CHECKPOINT_DIR", "WEBHOOK_SECRET")


class Demo:
    """``python -m scripts.demo`` (after ``launcher``, such as ``nohup``) with its output in ``log``; ``url`` is its
    API."""

    def __init__(self, log: Path, redis_url: str, launcher: tuple[str, ...] = ()):
        api_port, = free_ports(1)
        self.url = f"http://127.0.0.1:{api_port}"
        self.log = log
        env = {name: value for name, value in os.environ.items() if name not in FOREIGN_SETTINGS}
        with open(log, "wb") as out:
            self.process = subprocess.Popen([*launcher, sys.executable, "-m", "scripts.demo"], cwd=REPO, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**env, "PORT": str(api_port), "REDIS_URL": redis_url})
        self.children: list[int] = []
        deadline = time.monotonic() + READY_S
        try:
            while "[demo] facegen is ready" not in self.output():
                assert self.process.poll() is None and time.monotonic() < deadline, self.output()[-4000:]
                time.sleep(0.3)
        except BaseException:
            self.kill()
            raise
        self.children = child_processes(self.process.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def generate(self, **body: object) -> str:
        response = httpx.post(f"{self.url}/generate", json={"label": "smiling", **body}, timeout=10)
        assert response.status_code == 202, response.text
        return response.json()["job_id"]

    def wait_status(self, job_id: str, wanted: set[str], timeout_s: float = 180) -> str:
        def reached() -> str | None:
            status = job_state(self.url, job_id)["status"]
            return status if status in wanted else None

        return wait_for(reached, timeout_s, f"job {job_id} to be {' or '.join(sorted(wanted))}")

    def signal(self, signum: int) -> None:
        """``signum`` to the demo's process group, as a terminal sends Ctrl-C."""
        os.killpg(self.process.pid, signum)

    def wait(self) -> int:
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        """What a failed test leaves while the demo still runs: its group and its children's sessions."""
        if self.process.poll() is None:
            for pid in {self.process.pid, *self.children, *child_processes(self.process.pid)}:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process.wait()


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command's name (state, parent, ...), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def child_processes(parent: int) -> list[int]:
    """The processes whose parent is ``parent``."""
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [pid for pid in pids if (fields := stat_fields(pid)) and int(fields[1]) == parent]


def running(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


@pytest.fixture
def demo_without_redis(tmp_path: Path) -> Iterator[Demo]:
    """The demo on a machine where nothing answers at ``REDIS_URL``."""
    absent, = free_ports(1)
    demo = Demo(tmp_path / "demo.log", f"redis://127.0.0.1:{absent}/0")
    yield demo
    demo.kill()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.mark.services
def test_without_redis_it_starts_its_own_serves_a_grid_and_ctrl_c_stops_everything(demo_without_redis: Demo) -> None:
    demo = demo_without_redis
    started = [line for line in demo.output().splitlines() if line.startswith("[redisctl] no Redis at")]
    assert len(started) == 1, demo.output()[-3000:]
    redis_url = started[0].rsplit(" at ", 1)[1]
    assert reachable(redis_url)
    assert len(demo.children) == 4  # the API, the webhook sender, the worker and Redis

    job_id = demo.generate(count=4, seed=7)
    assert demo.wait_status(job_id, {"finished", "failed"}) == "finished"
    grid = Image.open(io.BytesIO(httpx.get(f"{demo.url}/jobs/{job_id}/result", timeout=10).content))
    grid.load()
    assert grid.format == "PNG" and min(grid.size) >= 64

    demo.signal(signal.SIGINT)
    assert demo.wait() == 0
    output = demo.output()
    assert "[demo] stopped" in output and "Traceback" not in output and "[demo] killing" not in output
    assert not any(running(pid) for pid in demo.children)
    assert not reachable(redis_url, timeout=0.5)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{demo.url}/healthz", timeout=2)


@pytest.mark.services
def test_a_job_running_at_sigterm_finishes_and_a_redis_it_did_not_start_stays(own_redis: RedisServer,
                                                                              tmp_path: Path) -> None:
    demo = Demo(tmp_path / "demo.log", own_redis.url)
    try:
        assert "[redisctl] no Redis" not in demo.output()
        job_id = demo.generate(count=16, steps=60, seed=3)
        assert demo.wait_status(job_id, {"started", "finished"}) == "started"
        demo.signal(signal.SIGTERM)
        assert demo.wait() == 0
    finally:
        demo.kill()
    output = demo.output()
    assert "[demo] stopped" in output and "Traceback" not in output and "[demo] killing" not in output
    with redis.Redis.from_url(own_redis.url) as connection:
        assert connection.ping()
        job = Job.fetch(job_id, connection=connection)
        assert job.get_status() == "finished", job.get_status()


@pytest.mark.services
def test_a_second_ctrl_c_kills_a_busy_worker_at_once(demo_without_redis: Demo) -> None:
    demo = demo_without_redis
    job_id = demo.generate(count=16, steps=400, seed=5)  # minutes of work on a CPU
    assert demo.wait_status(job_id, {"started", "finished"}) == "started"
    demo.signal(signal.SIGINT)
    time.sleep(1)
    demo.signal(signal.SIGINT)
    assert demo.wait() == 0
    output = demo.output()
    assert "[demo] killing the worker" in output and "[demo] stopped" in output and "Traceback" not in output
    assert not any(running(pid) for pid in demo.children)


@pytest.mark.services
def test_under_nohup_a_hangup_leaves_it_serving(tmp_path: Path) -> None:
    absent, = free_ports(1)
    demo = Demo(tmp_path / "demo.log", f"redis://127.0.0.1:{absent}/0", launcher=("nohup",))
    try:
        demo.signal(signal.SIGHUP)
        time.sleep(1)  # what a handled hangup would have started by now: the stop
        assert demo.process.poll() is None and "[demo] stopped" not in demo.output()
        assert httpx.get(f"{demo.url}/healthz", timeout=5).status_code == 200
        demo.signal(signal.SIGINT)
        assert demo.wait() == 0
    finally:
        demo.kill()
