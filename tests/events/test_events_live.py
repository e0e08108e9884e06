"""GET /jobs/{id}/events as deployed: ``python -m service`` (uvicorn) with API keys and ``python -m worker`` on a
tiny checkpoint, on a real Redis; the stream is read over HTTP as a browser's EventSource would."""

from __future__ import annotations

import base64
import io
import json
import secrets
import threading

import httpx
import pytest
from PIL import Image

from tests.conftest import flushed_database, redis_url_for_db
from tests.reliability.conftest import WorkerProcess, wait_for
from tests.service.conftest import LiveServer

REDIS_URL = redis_url_for_db(9)
KEYS = {name: f"{name}-{secrets.token_urlsafe(16)}" for name in ("a", "b")}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def conn():
    yield from flushed_database(REDIS_URL)


@pytest.fixture(scope="module")
def api(conn):
    server = LiveServer(REDIS_URL, env={"API_KEYS": ",".join(KEYS.values()), "EVENTS_KEEPALIVE_S": "1"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(api, tiny_checkpoints):
    process = WorkerProcess(REDIS_URL, tiny_checkpoints, MAX_BATCH="8", PREVIEW_INTERVAL="0.05")
    yield process
    process.stop()


def submit(url: str, **body) -> str:
    response = httpx.post(f"{url}/generate", json={"label": "smiling", "count": 1, **body}, headers=auth("a"),
                          timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def read_events(url: str, job_id: str, name: str = "a", params: dict | None = None,
                last_event_id: str | None = None, on_event=None) -> list[dict]:
    """Every event of the stream until the server ends it, as ``{"id", "event", "data"}`` (data parsed; comment
    lines skipped); ``on_event`` is called with each as it arrives."""
    headers = {**auth(name), **({"Last-Event-ID": last_event_id} if last_event_id else {})}
    events, current = [], {}
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", params=params, headers=headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if current:
                    current["data"] = json.loads(current["data"])
                    events.append(current)
                    if on_event:
                        on_event(current)
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                current[field] = value
    return events


def steps_of(events: list[dict]) -> list[int]:
    return [e["data"]["progress"]["step"] for e in events if e["event"] == "progress"]


def test_a_20_step_job_streams_every_step_in_order_then_finished(api, worker):
    job_id = submit(api.url, steps=20, seed=1)
    events = read_events(api.url, job_id)
    names = [e["event"] for e in events]
    assert names[-1] == "finished" and names.count("finished") == 1, names
    assert "started" in names and names.index("started") < names.index("progress")
    assert steps_of(events) == list(range(1, 21))
    assert all(e["data"]["progress"]["total"] == 20 for e in events if e["event"] == "progress")
    ids = [tuple(map(int, e["id"].split("-"))) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert httpx.get(f"{api.url}/jobs/{job_id}/result", headers=auth("a"), timeout=10).status_code == 200


def test_last_event_id_resumes_without_repeats(api, worker):
    job_id = submit(api.url, steps=20, seed=2)
    first = read_events(api.url, job_id)
    tenth = next(e for e in first if e["event"] == "progress" and e["data"]["progress"]["step"] == 10)
    resumed = read_events(api.url, job_id, last_event_id=tenth["id"])
    assert steps_of(resumed) == list(range(11, 21))
    assert [e["id"] for e in resumed] == [e["id"] for e in first[first.index(tenth) + 1:]]
    after_end = httpx.get(f"{api.url}/jobs/{job_id}/events", headers={**auth("a"), "Last-Event-ID": first[-1]["id"]},
                          timeout=10)
    assert after_end.status_code == 204  # an EventSource stops reconnecting


def test_another_keys_job_is_404_and_the_owners_stream_works(api, worker):
    job_id = submit(api.url, steps=2, seed=3)
    assert httpx.get(f"{api.url}/jobs/{job_id}/events", headers=auth("b"), timeout=10).status_code == 404
    assert httpx.get(f"{api.url}/jobs/{job_id}/events", timeout=10).status_code == 401
    assert read_events(api.url, job_id, "a")[-1]["event"] == "finished"


def test_previews_are_small_decodable_pngs_sent_only_to_clients_that_ask(api, worker):
    job_id = submit(api.url, steps=200, sampler="ddim", seed=4)
    events = read_events(api.url, job_id, params={"preview": "true"})
    previews = [e["data"]["preview"] for e in events if "preview" in e["data"]]
    assert previews, [e["event"] for e in events]
    for encoded in previews:
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        image.load()
        assert image.format == "PNG" and image.mode == "RGB" and max(image.size) <= 64
    assert steps_of(events) == list(range(1, 201))
    assert not any("preview" in e["data"] for e in read_events(api.url, job_id))


def test_a_queued_job_streams_its_position_then_canceled(api, worker):
    running = submit(api.url, steps=1000, sampler="ddpm", seed=5)
    wait_for(lambda: httpx.get(f"{api.url}/jobs/{running}", headers=auth("a"), timeout=10).json()["status"]
             == "started", 60, "the long job to start")
    queued = submit(api.url, steps=2, seed=6)
    seen = threading.Event()

    def on_event(event: dict) -> None:
        if event["event"] == "queued":
            seen.set()

    reader = threading.Thread(target=lambda: box.append(read_events(api.url, queued, on_event=on_event)))
    box: list[list[dict]] = []
    reader.start()
    assert seen.wait(30)
    assert httpx.delete(f"{api.url}/jobs/{queued}", headers=auth("a"), timeout=10).status_code == 200
    reader.join(30)
    events = box[0]
    assert [e["event"] for e in events] == ["queued", "canceled"]
    assert events[0]["data"]["queue_position"] == 0
    assert httpx.delete(f"{api.url}/jobs/{running}", headers=auth("a"), timeout=10).status_code == 202
    assert read_events(api.url, running)[-1]["event"] == "canceled"
