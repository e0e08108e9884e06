"""The playground page driven by headless Chromium (DevTools protocol) against a live server and a fake worker."""

from __future__ import annotations

import base64
import io
import itertools
import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from facegen.contract import spec
from scripts.processes import stop_process
from tests.service.conftest import LiveServer
from tests.service.fakeworker import model_info, publish_model, wait_until

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,1000", "--remote-debugging-port=0",
]


def chromium_binary() -> str:
    found = shutil.which("chromium") or (Path("/usr/bin/chromium").exists() and "/usr/bin/chromium")
    if not found:
        pytest.fail("install chromium (apt-get install chromium): the playground test drives the page in it")
    return found


class DevTools:
    """Just enough of the Chrome DevTools protocol: one page target, commands by name, no events."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        self.process = subprocess.Popen([chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        port = wait_until(lambda: port_file.exists() and port_file.read_text().split("\n")[0].strip(),
                          timeout=60, what="Chromium's DevTools port")
        pages = wait_until(lambda: [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json()
                                    if t["type"] == "page"], what="a page target")
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def send(self, method: str, **params):
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            stop_process(self.process, grace_s=15)


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    devtools = DevTools(profile)
    yield devtools
    devtools.close()


STATE_JS = """(() => {
  if (!document.body || !document.getElementById('result-image')) return null;  // still loading
  const img = document.getElementById('result-image');
  const gif = document.getElementById('animation-image');
  const singles = Array.from(document.querySelectorAll('#singles a')).map(a => a.dataset.index);
  return {
    state: document.body.dataset.state,
    status: document.getElementById('status').textContent,
    error: document.getElementById('error').textContent,
    width: img.naturalWidth, height: img.naturalHeight, gifWidth: gif.naturalWidth,
    share: document.getElementById('share').value,
    labels: Array.from(document.getElementById('label').options).map(o => o.value),
    label: document.getElementById('label').value,
    seed: document.getElementById('seed').value,
    count: document.getElementById('count').value,
    singles: singles,
    transition: document.getElementById('transition').checked,
  };
})()"""


def test_playground_generates_and_shows_images(live_server, background_worker, browser, tmp_path):
    query = "label=not_smiling&count=6&seed=424242&sampler=ddim&steps=12&animation=1&run=1"
    browser.send("Page.enable")
    browser.send("Page.navigate", url=f"{live_server.url}/?{query}")

    def finished():
        page = browser.evaluate(STATE_JS)
        assert page is None or page["state"] != "error", page
        return page if page and page["state"] == "done" else None

    page = wait_until(finished, timeout=90, interval=0.2, what="the playground to show the images")
    shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "playground.png").write_bytes(shot)
    print(f"screenshot: {tmp_path / 'playground.png'}")
    assert Image.open(io.BytesIO(shot)).size[0] > 0

    # Pre-filled from the query string, auto-run, and the images decoded in the page.
    assert page["labels"] == ["smiling", "not_smiling"]  # from GET /models (the fake worker's model)
    assert (page["label"], page["count"], page["seed"]) == ("not_smiling", "6", "424242")
    assert (page["width"], page["height"]) == (6 * 8, 8)
    assert page["gifWidth"] == 6 * 8
    assert page["status"] == "Done."
    # The share link reproduces the request.
    shared = parse_qs(urlsplit(page["share"]).query)
    assert shared["seed"] == ["424242"] and shared["label"] == ["not_smiling"] and shared["run"] == ["1"]
    assert shared["sampler"] == ["ddim"] and shared["steps"] == ["12"] and shared["animation"] == ["1"]


def test_playground_shows_api_errors(live_server, background_worker, browser, conn):
    browser.send("Page.enable")
    browser.send("Page.navigate", url=f"{live_server.url}/?label=smiling&count=65&run=1")
    page = wait_until(lambda: (p := browser.evaluate(STATE_JS)) and p["state"] == "error" and p,
                      timeout=60, interval=0.2, what="the playground to show the error")
    assert page["error"].startswith("count: Input should be less than or equal to 64")
    assert background_worker.worker.behaviour.runs == []  # nothing was queued


def test_playground_sends_the_api_key(redis_url, background_worker, browser):
    server = LiveServer(redis_url, env={"API_KEYS": "playground-key"})
    try:
        browser.send("Page.enable")
        browser.send("Page.navigate", url=f"{server.url}/?label=smiling&count=1&run=1")
        page = wait_until(lambda: (p := browser.evaluate(STATE_JS)) and p["state"] == "error" and p,
                          timeout=60, interval=0.2, what="the playground to ask for a key")
        assert "needs an API key" in page["error"]
        # Type the key the way a user does (the field's change event), then submit the form.
        browser.evaluate("""(() => { const k = document.getElementById('apikey'); k.value = 'playground-key';
                                      k.dispatchEvent(new Event('change'));
                                      document.getElementById('submit').click(); })()""")
        page = wait_until(lambda: (p := browser.evaluate(STATE_JS)) and p["state"] in ("done", "error") and p,
                          timeout=90, interval=0.2, what="the keyed request to finish")
        assert page["state"] == "done", page
        assert page["width"] == 8
    finally:
        server.stop()


def test_playground_transition_and_single_image_links(live_server, background_worker, browser):
    browser.send("Page.enable")
    browser.send("Page.navigate", url=f"{live_server.url}/?label=smiling&count=3&seed=5&transition=1&run=1")
    page = wait_until(lambda: (p := browser.evaluate(STATE_JS)) and p["state"] in ("done", "error") and p,
                      timeout=90, interval=0.2, what="the transition to show")
    assert page["state"] == "done", page
    assert page["transition"] and page["gifWidth"] == 3 * 8
    assert parse_qs(urlsplit(page["share"]).query)["transition"] == ["1"]
    assert page["singles"] == ["0", "1", "2"]
    links = browser.evaluate("Array.from(document.querySelectorAll('#singles a')).map(a => a.href)")
    for link in links:
        single = httpx.get(link)
        assert single.status_code == 200 and Image.open(io.BytesIO(single.content)).size == (8, 8)


SAMPLING_JS = """(() => {
  if (!document.body || !document.getElementById('steps')) return null;  // still loading
  const student = document.querySelector('#sampler option[value="student"]');
  const steps = document.getElementById('steps');
  return {
    state: document.body.dataset.state,
    models: Array.from(document.getElementById('model').options).map(o => o.value),
    offered: !student.hidden && !student.disabled,
    sampler: document.getElementById('sampler').value,
    stepsMax: steps.max, stepsPlaceholder: steps.placeholder,
    share: document.getElementById('share').value,
    status: document.getElementById('status').textContent,
    error: document.getElementById('error').textContent,
  };
})()"""


def choose(browser: DevTools, field: str, value: str) -> None:
    """Pick ``value`` in the select ``field`` the way a user does (its change event)."""
    browser.evaluate(f"""(() => {{ const s = document.getElementById('{field}'); s.value = '{value}';
                                   s.dispatchEvent(new Event('change')); }})()""")


def test_playground_offers_the_student_only_for_a_model_that_serves_one(live_server, background_worker, browser,
                                                                       conn):
    """GET /models lists the fake worker's model (no student, "latest") and one with a student: the student sampler
    is offered for that one only, its steps bounded by the student's max_steps, and a student request runs."""
    student = spec.StudentInfo(version="fake-student-v1", max_steps=6, default_steps=3, guidance_range=(1.0, 8.0))
    publish_model(conn, model_info("fake-v2", is_latest=False).model_copy(update={"student": student}), ttl=300)
    browser.send("Page.enable")
    browser.send("Page.navigate", url=f"{live_server.url}/?label=smiling&count=2&seed=7&sampler=student")
    page = wait_until(lambda: (p := browser.evaluate(SAMPLING_JS)) and p["state"] == "ready" and p,
                      timeout=60, interval=0.2, what="the playground to load the models")
    assert page["models"] == ["latest", "fake-v1", "fake-v2"]
    # "latest" has no student: not offered, and the link's sampler falls back to the default
    assert not page["offered"] and page["sampler"] == "dpmpp" and page["stepsMax"] == "1000"

    choose(browser, "model", "fake-v2")
    page = browser.evaluate(SAMPLING_JS)
    assert page["offered"] and page["sampler"] == "dpmpp"
    choose(browser, "sampler", "student")
    page = browser.evaluate(SAMPLING_JS)
    assert (page["stepsMax"], page["stepsPlaceholder"]) == ("6", "default (3)")  # the student's, not the model's
    choose(browser, "model", "latest")  # back to a model without one: the student goes away again
    page = browser.evaluate(SAMPLING_JS)
    assert not page["offered"] and page["sampler"] == "dpmpp" and page["stepsMax"] == "1000"

    choose(browser, "model", "fake-v2")
    choose(browser, "sampler", "student")
    browser.evaluate("""(() => { document.getElementById('steps').value = '2';
                                  document.getElementById('submit').click(); })()""")
    page = wait_until(lambda: (p := browser.evaluate(SAMPLING_JS)) and p["state"] in ("done", "error") and p,
                      timeout=90, interval=0.2, what="the student request to finish")
    assert page["state"] == "done", page
    shared = parse_qs(urlsplit(page["share"]).query)
    assert (shared["sampler"], shared["steps"], shared["model"]) == (["student"], ["2"], ["fake-v2"])
    (job_id,) = background_worker.worker.behaviour.runs
    parameters = httpx.get(f"{live_server.url}/jobs/{job_id}").json()["parameters"]
    assert (parameters["sampler"], parameters["steps"], parameters["model"]) == ("student", 2, "fake-v2")
