"""Work units through the API (in-process app, real Redis): one request's cost is capped (422 naming the fields that
set it), a job shows its cost, and an edit's admission is decided before its upload is decoded, so an edit refused
by the queue cap, a quota or the rate never reaches the decoder."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from facegen.contract import cost, spec
from facegen.contract.fields import MAX_ANIMATION_FRAMES, MAX_COUNT, MAX_STEPS
from service import uploads
from service.config import Settings

KEY = "key-units-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
HUGE = {"count": MAX_COUNT, "steps": MAX_STEPS, "animation": True, "animation_frames": MAX_ANIMATION_FRAMES}


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def generate_spec(**body) -> spec.JobSpec:
    return spec.JobSpec(attributes={"Smiling": True}, seed=0, **body)


def face_png() -> bytes:
    """A real 80x96 RGB PNG (the decoder has work to do)."""
    buffer = io.BytesIO()
    Image.radial_gradient("L").resize((80, 96)).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Calls of service.uploads.prepare_upload (the upload's decoder), one entry per call."""
    calls: list[int] = []
    real = uploads.prepare_upload

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(uploads, "prepare_upload", counting)
    return calls


def post_edit(client, headers=AUTH, **form):
    return client.post("/edit", data={"label": "smiling", **form}, files={"image": ("face.png", face_png())},
                       headers=headers)


def test_the_largest_request_costs_more_than_the_cap_and_many_default_requests():
    settings = Settings()
    huge = cost.job_units(generate_spec(**HUGE))
    assert cost.job_units(generate_spec()) == cost.DEFAULT_REQUEST_UNITS
    assert huge > settings.max_request_units
    assert huge > 800 * cost.DEFAULT_REQUEST_UNITS  # it counted as 64 images (16 default requests) before
    assert cost.job_units(generate_spec(sampler="ddpm")) > 40 * cost.job_units(generate_spec())


def test_a_request_over_the_cap_is_refused_naming_the_fields_that_set_its_cost(client, conn):
    answer = client.post("/generate", json={"label": "smiling", **HUGE})
    assert answer.status_code == 422
    problems = answer.json()["detail"]
    assert [p["loc"] for p in problems] == [["body", "count"], ["body", "steps"], ["body", "animation_frames"]]
    assert "costs 81143 work units, over the 10000" in problems[0]["msg"]
    assert "MAX_REQUEST_UNITS" in problems[0]["msg"]
    assert conn.llen(f"rq:queue:{spec.DEFAULT_QUEUE}") == 0
    assert client.post("/generate", json={"label": "smiling", "count": 64}).status_code == 202  # 1600 units


def test_the_cap_of_a_key_is_no_more_than_its_quota_can_ever_admit(make_client):
    client = make_client(api_keys=KEY, quota_overrides={key_id(KEY): {"units_per_minute": 150}})
    refused = client.post("/generate", json={"label": "smiling", "count": 8}, headers=AUTH)  # 200 units
    assert refused.status_code == 422
    assert "over the 150 one request may cost (this API key's units_per_minute" in refused.json()["detail"][0]["msg"]
    edit = post_edit(client, steps="200", strength="1.0")  # 1000 units: 422 naming the edit's fields
    assert edit.status_code == 422
    assert [p["loc"] for p in edit.json()["detail"]] == [["body", "steps"], ["body", "strength"]]


def test_a_job_shows_its_cost(client):
    # guidance 1: one UNet row per step instead of two; ddim: 50 steps
    expected = [({}, 100), ({"count": 1}, 25), ({"count": 2, "guidance_scale": 1.0}, 27), ({"sampler": "ddim"}, 243)]
    for body, units in expected:
        job_id = client.post("/generate", json={"label": "smiling", **body}).json()["job_id"]
        assert client.get(f"/jobs/{job_id}").json()["cost_units"] == units == cost.job_units(generate_spec(**body))


@pytest.mark.parametrize(("limits", "limit"), [
    ({"quota_queued_jobs": 1}, "queued_jobs"),
    ({"quota_queued_units": 150}, "queued_units"),
    ({"quota_units_per_minute": 150}, "units_per_minute"),
    ({"max_queued": 1}, "max_queued"),
])
def test_an_edit_refused_by_admission_is_never_decoded(make_client, decodes, limits, limit):
    client = make_client(api_keys=KEY, **limits)
    assert client.post("/generate", json={"label": "smiling"}, headers=AUTH).status_code == 202  # 100 units
    refused = post_edit(client)  # 74 units, a valid image
    assert refused.status_code == 429 and refused.json()["limit"] == limit
    assert decodes == []


def test_an_admitted_edit_is_decoded_once_and_its_replay_not_again(make_client, decodes, conn):
    client = make_client(api_keys=KEY, quota_units_per_minute=100)
    first = post_edit(client, headers={**AUTH, "Idempotency-Key": "edit-1"})
    assert first.status_code == 202 and decodes == [1]
    job_id = first.json()["job_id"]
    assert client.get(f"/jobs/{job_id}", headers=AUTH).json()["cost_units"] == 74
    assert conn.hget(f"rq:job:{job_id}", spec.UNITS_FIELD) == b"74"
    # the rate is spent (74 of 100 units): a new edit is refused undecoded, the replay still answers
    assert post_edit(client).json()["limit"] == "units_per_minute"
    replay = post_edit(client, headers={**AUTH, "Idempotency-Key": "edit-1"})
    assert replay.status_code == 202 and replay.json()["job_id"] == job_id
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert decodes == [1]


def test_an_edits_units_are_charged_once(make_client, decodes):
    """The decision before decoding takes the edit's units from the rate; the enqueue does not take them again."""
    client = make_client(api_keys=KEY, quota_units_per_minute=150)  # room for two 74-unit edits
    assert [post_edit(client).status_code for _ in range(2)] == [202, 202]
    assert post_edit(client).json()["limit"] == "units_per_minute"
    assert len(decodes) == 2
