"""Request field types are defined once (facegen/contract/fields.py): the HTTP schemas, POST /edit's form and the job
spec carry the very same constraints, both submitting routes refuse a bad field with a 422 naming it, and requests
that leave the seed out get it from the one seed draw."""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin, get_type_hints

import pytest
from PIL import Image
from pydantic import Field

from facegen.contract import fields, spec
from service.api.routes import edit
from service.schemas import JobCreate

REPO = Path(__file__).resolve().parents[2]
EDIT_FORM = get_type_hints(edit.create_edit, include_extras=True)

# shared type -> the fields built from it: (model or form, field name)
USES: list[tuple[str, Any, list[tuple[Any, str]]]] = [
    ("ModelVersion", fields.ModelVersion, [(JobCreate, "model"), (spec.JobSpec, "model"), (edit, "model")]),
    ("AttributeMap", fields.AttributeMap, [(JobCreate, "attributes"), (spec.JobSpec, "attributes")]),
    ("Seed", fields.Seed, [(JobCreate, "seed"), (spec.JobSpec, "seed"), (edit, "seed")]),
    ("Count", fields.Count, [(JobCreate, "count"), (spec.JobSpec, "count")]),
    ("Steps", fields.Steps, [(JobCreate, "steps"), (spec.JobSpec, "steps"), (edit, "steps")]),
    ("GuidanceScale", fields.GuidanceScale,
     [(JobCreate, "guidance_scale"), (spec.JobSpec, "guidance_scale"), (edit, "guidance_scale")]),
    ("AnimationFrames", fields.AnimationFrames, [(JobCreate, "animation_frames"), (spec.JobSpec, "animation_frames")]),
    ("AnimationFps", fields.AnimationFps, [(JobCreate, "animation_fps"), (spec.JobSpec, "animation_fps")]),
    ("TransitionFrames", fields.TransitionFrames,
     [(JobCreate, "transition_frames"), (spec.JobSpec, "transition_frames")]),
    ("FirstIndex", fields.FirstIndex, [(JobCreate, "first_index"), (spec.JobSpec, "first_index")]),
    ("Label", fields.Label, [(JobCreate, "label"), (edit, "label")]),
    ("Strength", fields.Strength, [(spec.EditParameters, "strength"), (edit, "strength")]),
]


def annotation_of(owner: Any, name: str) -> Any:
    return EDIT_FORM[name] if owner is edit else get_type_hints(owner, include_extras=True)[name]


def built_from(annotation: Any, shared: Any) -> bool:
    """Whether ``annotation`` (maybe ``X | None``, maybe with more metadata) holds every constraint object of the
    ``Annotated`` type ``shared`` itself: the same objects, not equal copies."""
    wanted = get_args(shared)[1:]
    if get_origin(annotation) is Annotated:
        metadata = get_args(annotation)[1:]
        if all(any(item is constraint for item in metadata) for constraint in wanted):
            return True
    return any(built_from(arg, shared) for arg in get_args(annotation))


@pytest.mark.parametrize(("shared", "users"), [(t, u) for _, t, u in USES], ids=[n for n, _, _ in USES])
def test_request_schema_form_and_spec_share_one_definition(shared, users) -> None:
    for owner, name in users:
        assert built_from(annotation_of(owner, name), shared), (getattr(owner, "__name__", owner), name)


def test_a_copy_of_a_constraint_is_not_taken_for_the_definition() -> None:
    copy = Annotated[str, *get_args(fields.ModelVersion)[1:]]
    assert built_from(copy, fields.ModelVersion)
    assert not built_from(Annotated[str, Field(min_length=1, max_length=64)], fields.ModelVersion)


def test_the_edit_attributes_field_is_parsed_with_the_shared_bounds() -> None:
    assert edit._ATTRIBUTES.validate_python({"Smiling": True}) == {"Smiling": True}
    too_many = {f"A{k}": True for k in range(fields.MAX_ATTRIBUTES + 1)}
    with pytest.raises(ValueError, match="too_long|at most"):
        edit._ATTRIBUTES.validate_python(too_many)


def source_files() -> list[Path]:
    return [path for room in ("service", "facegen/contract", "worker") for path in (REPO / room).rglob("*.py")]


@pytest.mark.parametrize("texts", [("A-Za-z0-9._-",), ("randbelow(", "getrandbits(", "SystemRandom")],
                         ids=["version pattern", "seed draw"])
def test_version_pattern_and_seed_draw_are_written_once(texts) -> None:
    holders = [str(path.relative_to(REPO)) for path in source_files() if any(t in path.read_text() for t in texts)]
    assert holders == ["facegen/contract/fields.py"], holders


def test_no_router_imports_another_router() -> None:
    for path in (REPO / "service/api/routes").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not {name for name in imported if name.startswith("service.api.routes")}, path.name


# ----- both submitting routes, through the app ----------------------------------------------------------------
def face() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 90, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def post_generate(client, **values):
    return client.post("/generate", json={"label": "smiling", **values})


def post_edit(client, **values):
    form = {"label": "smiling", **{k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}}
    if form.get("attributes") is not None:
        form.pop("label")
    return client.post("/edit", data=form, files={"image": ("face.png", face())})


INVALID = [  # (field, value): bad on both routes
    ("model", "a/b"),
    ("model", "x" * (fields.MAX_VERSION_LENGTH + 1)),
    ("model", "v9"),  # no worker serves it
    ("attributes", {}),
    ("attributes", {f"A{k}": True for k in range(fields.MAX_ATTRIBUTES + 1)}),
    ("attributes", {"Wearing_Hat": True}),  # not an attribute of the model
    ("attributes", {"Smiling": "maybe"}),
    ("seed", -1),
    ("seed", fields.MAX_SEED + 1),
    ("seed", "abc"),
    ("steps", fields.MAX_STEPS + 1),
    ("guidance_scale", fields.MAX_GUIDANCE + 1),
    ("label", "x" * (fields.MAX_LABEL_LENGTH + 1)),
    ("label", "happy"),
]


@pytest.mark.parametrize("post", [post_generate, post_edit], ids=["generate", "edit"])
@pytest.mark.parametrize(("field", "value"), INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_a_bad_field_is_422_naming_it_on_both_routes(client, conn, post, field, value) -> None:
    if post is post_generate and field == "attributes":
        answer = client.post("/generate", json={"attributes": value})
    else:
        answer = post(client, **{field: value})
    assert answer.status_code == 422, answer.text
    locs = [tuple(error["loc"]) for error in answer.json()["detail"]]
    assert any(loc[:2] == ("body", field) for loc in locs), locs
    assert conn.llen("rq:queue:" + spec.DEFAULT_QUEUE) == 0


@pytest.mark.parametrize("post", [post_generate, post_edit], ids=["generate", "edit"])
def test_the_bounds_themselves_are_accepted_on_both_routes(client, post) -> None:
    answer = post(client, seed=fields.MAX_SEED, steps=fields.MAX_STEPS, guidance_scale=fields.MAX_GUIDANCE,
                  model=fields.LATEST)
    assert answer.status_code == 202, answer.text
    assert answer.json()["seed"] == fields.MAX_SEED


@pytest.mark.parametrize("post", [post_generate, post_edit], ids=["generate", "edit"])
def test_a_missing_seed_comes_from_the_one_draw(client, monkeypatch, post) -> None:
    monkeypatch.setattr(fields, "draw_seed", lambda: 777)
    assert post(client).json()["seed"] == 777
    assert post(client, seed=5).json()["seed"] == 5


def test_drawn_seeds_stay_exact_in_javascript() -> None:
    assert all(0 <= fields.draw_seed() <= fields.MAX_RANDOM_SEED for _ in range(1000))
    assert fields.MAX_RANDOM_SEED == 2**53 - 1 < fields.MAX_SEED
