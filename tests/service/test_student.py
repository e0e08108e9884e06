"""The student sampler at the API: GET /models shows each model's distilled student, POST /generate queues student
jobs where the model serving them has one (steps and guidance as that student takes them) and answers 422 naming
the field otherwise, and POST /edit keeps its own sampler."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from facegen.contract import fields, spec
from tests.service.fakeworker import model_info, publish_model

STUDENT = spec.StudentInfo(version="fake-student", max_steps=4, default_steps=2, guidance_range=(1.0, 8.0))


def with_student(version: str = "fake-v1") -> spec.ModelInfo:
    """A model entry as a worker serving a student publishes it."""
    info = model_info(version)
    return info.model_copy(update={"student": STUDENT, "default_steps": {**info.default_steps, "student": 2}})


def queued(conn) -> int:
    return conn.llen("rq:queue:" + spec.DEFAULT_QUEUE)


def test_models_show_each_models_student_or_none(client, conn) -> None:
    publish_model(conn, model_info("v1", is_latest=False))
    publish_model(conn, with_student("v2"))
    plain, distilled = client.get("/models").json()["models"]
    assert plain["student"] is None and "student" not in plain["default_steps"]
    assert distilled["student"] == {"version": "fake-student", "max_steps": 4, "default_steps": 2,
                                    "guidance_range": [1.0, 8.0]}
    assert distilled["default_steps"]["student"] == 2


def test_student_jobs_are_queued_where_the_model_has_a_student(client, conn) -> None:
    publish_model(conn, with_student())
    for body in ({}, {"steps": 1}, {"steps": STUDENT.max_steps, "guidance_scale": 8.0}, {"guidance_scale": 0.0},
                 {"steps": 4, "animation": True}, {"count": 2, "transition": True, "transition_frames": 3}):
        answer = client.post("/generate", json={"label": "smiling", "sampler": "student", **body})
        assert answer.status_code == 202, (body, answer.text)
    assert queued(conn) == 6
    job = client.get(answer.json()["links"]["self"]).json()
    assert job["parameters"]["sampler"] == "student"
    # 2 images x 3 frames x 4 steps (the contract's default) x 1 row + 6 decodes x 2 rows = 36 rows: 22 units
    assert job["cost_units"] == 22


@pytest.mark.parametrize(("field", "body", "published"), [
    ("sampler", {}, model_info()),  # the model has no student
    ("steps", {"steps": fields.MAX_STUDENT_STEPS + 1}, None),  # the contract's bound, even with no worker live
    ("steps", {"steps": STUDENT.max_steps + 1}, with_student()),  # more than this student takes
    ("guidance_scale", {"guidance_scale": 12.0}, with_student()),  # outside what it was distilled for
    ("guidance_scale", {"guidance_scale": 0.5}, with_student()),
], ids=["no-student", "contract-steps", "student-steps", "guidance-above", "guidance-between"])
def test_a_student_request_it_cannot_serve_is_422_naming_the_field(client, conn, field, body, published) -> None:
    if published is not None:
        publish_model(conn, published)
    answer = client.post("/generate", json={"label": "smiling", "sampler": "student", **body})
    assert answer.status_code == 422, answer.text
    errors = answer.json()["detail"]
    assert [tuple(error["loc"]) for error in errors] == [("body", field)], errors
    assert ("student" in errors[0]["msg"]) and queued(conn) == 0


def face_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 90, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_edit_keeps_ddim_and_refuses_any_other_sampler_naming_it(client, conn) -> None:
    publish_model(conn, with_student())
    for sampler, status in (("student", 422), ("dpmpp", 422), ("euler", 422), ("ddim", 202)):
        answer = client.post("/edit", data={"label": "smiling", "sampler": sampler},
                             files={"image": ("face.png", face_png())})
        assert answer.status_code == status, answer.text
        if status == 422:
            assert [tuple(error["loc"]) for error in answer.json()["detail"]] == [("body", "sampler")]
    assert queued(conn) == 1
