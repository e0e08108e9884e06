"""The reference docs against the code they describe.

- docs/CONFIGURATION.md documents every setting of every process: for each settings class (the API's
  ``service.config.Settings``, the worker's ``worker.settings.WorkerSettings``, the model store CLI's
  ``facegen.contract.model_store.ModelStoreSettings``, and the classes they inherit
  fields from, reached through their MRO), the environment variables in its section are exactly the class's
  fields, named as pydantic-settings reads them (``env_prefix``, aliases, case), each with the field's default
  rendered by :func:`render_default`.
- docs/API.md lists every route of the app (method and path) and every request field of ``POST /generate`` and
  ``POST /edit``, and nothing the app does not have.
- README.md stays short (at most ``README_MAX_LINES`` lines).
- Every relative link in README.md, the other top-level Markdown files and docs/*.md points at a file that exists,
  and a ``#anchor`` into a Markdown file at one of its headings.

A section of docs/CONFIGURATION.md belongs to a settings class when its ``## `` heading names the class in
backticks (```RedisSettings```); every table row under it, up to the next ``## `` heading, is a setting:
``| `VARIABLE` | default | meaning |``.
"""

from __future__ import annotations

import enum
import json
import re
from pathlib import Path, PurePath
from typing import Any

import pytest
from pydantic import SecretStr
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

import service.config
import worker.settings
from facegen.contract.model_store import ModelStoreSettings

REPO = Path(__file__).resolve().parents[1]
API = REPO / "docs" / "API.md"
CONFIGURATION = REPO / "docs" / "CONFIGURATION.md"
README = REPO / "README.md"
README_MAX_LINES = 160
SETTINGS_CLASSES = (service.config.Settings, worker.settings.WorkerSettings, ModelStoreSettings)
UNSET = "unset"


# ----- settings ----------------------------------------------------------------------------------------------
def render_default(value: Any) -> str:
    """A default as docs/CONFIGURATION.md writes it (without the backticks): ``unset`` for None and empty
    collections, ``true``/``false``, numbers in the shortest form (``2``, ``0.1``), collections as the
    comma-separated form their variable takes, paths inside the repository relative to it."""
    if value is None or (isinstance(value, tuple | list | dict | set | frozenset) and not value):
        return UNSET
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return render_default(value.value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, PurePath):
        path = Path(value)
        return path.relative_to(REPO).as_posix() if path.is_absolute() and path.is_relative_to(REPO) else str(path)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), default=str)
    if isinstance(value, tuple | list):
        return ",".join(":".join(map(render_default, item)) if isinstance(item, tuple | list) else render_default(item)
                        for item in value)
    return '""' if value == "" else str(value)


def field_default(field: Any) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return "(required)" if field.default is PydanticUndefined else field.default


def env_name(settings_class: type[BaseSettings], name: str) -> str:
    """The environment variable pydantic-settings reads field ``name`` of ``settings_class`` from."""
    field = settings_class.model_fields[name]
    alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
    if alias is None and field.validation_alias is not None:  # AliasChoices: the first choice, as documented
        alias = str(field.validation_alias.choices[0])
    variable = alias or f"{settings_class.model_config.get('env_prefix', '')}{name}"
    return variable if settings_class.model_config.get("case_sensitive", False) else variable.upper()


def own_fields(cls: type[BaseSettings]) -> list[str]:
    """The fields ``cls`` declares itself (not those it inherits)."""
    return [name for name in cls.__dict__.get("__annotations__", {}) if name in cls.model_fields]


def field_classes(settings_class: type[BaseSettings]) -> list[type[BaseSettings]]:
    """``settings_class`` and the classes of its MRO that declare fields of it."""
    return [cls for cls in settings_class.__mro__
            if isinstance(cls, type) and issubclass(cls, BaseSettings) and cls is not BaseSettings and own_fields(cls)]


def documented_settings(text: str) -> dict[str, dict[str, str]]:
    """``{class name: {VARIABLE: default}}`` from the ``## `` sections of docs/CONFIGURATION.md that name a class."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in strip_code_blocks(text).splitlines():
        if line.startswith("## "):
            names = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", line)
            current = sections.setdefault(names[0], {}) if names else None
            continue
        if current is None or not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or set(cells[0]) <= {"-", ":", " "} or not cells[0].startswith("`"):
            continue  # the header row, its rule, or prose in a table
        variable = cells[0].strip("`")
        assert variable not in current, f"{variable} documented twice in one section"
        current[variable] = cells[1].strip("`")
    return sections


@pytest.fixture(scope="module")
def documented() -> dict[str, dict[str, str]]:
    return documented_settings(CONFIGURATION.read_text())


@pytest.mark.parametrize("settings_class", SETTINGS_CLASSES, ids=lambda cls: cls.__name__)
def test_every_setting_is_documented_with_its_default(settings_class: type[BaseSettings],
                                                      documented: dict[str, dict[str, str]]) -> None:
    for cls in field_classes(settings_class):
        assert cls.__name__ in documented, f"docs/CONFIGURATION.md has no '## ' section naming `{cls.__name__}`"
        expected = {env_name(settings_class, name): render_default(field_default(settings_class.model_fields[name]))
                    for name in own_fields(cls)}
        written = documented[cls.__name__]
        missing, extra = expected.keys() - written.keys(), written.keys() - expected.keys()
        assert not missing, f"`{cls.__name__}` in docs/CONFIGURATION.md does not document {sorted(missing)}"
        assert not extra, f"`{cls.__name__}` in docs/CONFIGURATION.md documents what it has no field for: {sorted(extra)}"
        wrong = {name: (written[name], default) for name, default in expected.items() if written[name] != default}
        assert not wrong, f"`{cls.__name__}`: documented default != the field's default: {wrong}"


def test_every_documented_settings_class_is_read_by_a_process(documented: dict[str, dict[str, str]]) -> None:
    known = {cls.__name__ for settings_class in SETTINGS_CLASSES for cls in field_classes(settings_class)}
    assert documented.keys() <= known, f"sections for classes no process reads: {sorted(documented.keys() - known)}"


def test_the_documented_defaults_check_can_fail() -> None:
    """A table with a row left out, a row too many or a wrong default is caught."""
    text = CONFIGURATION.read_text()
    complete = documented_settings(text)["RedisSettings"]
    row = next(line for line in text.splitlines() if line.startswith("| `REDIS_TIMEOUT_S` |"))
    assert "REDIS_TIMEOUT_S" not in documented_settings(text.replace(row + "\n", ""))["RedisSettings"]
    assert len(documented_settings(text.replace(row, row + "\n| `REDIS_EXTRA` | `1` | x |"))["RedisSettings"]) == (
        len(complete) + 1)
    assert documented_settings(text.replace(row, row.replace("`2`", "`3`")))["RedisSettings"]["REDIS_TIMEOUT_S"] == "3"


def test_render_default() -> None:
    assert [render_default(v) for v in (None, (), {}, True, 2.0, 0.1, 900, "", "redis", (10, 30), (("h", 1),))] == [
        UNSET, UNSET, UNSET, "true", "2", "0.1", "900", '""', "redis", "10,30", "h:1"]
    assert render_default(REPO / "checkpoints") == "checkpoints"


# ----- API ---------------------------------------------------------------------------------------------------
def table_rows(text: str, heading: str | None = None) -> list[list[str]]:
    """The cells of every table row (header rules left out) in ``text``, or in its ``## heading`` section only."""
    rows, inside = [], heading is None
    for line in strip_code_blocks(text).splitlines():
        if line.startswith("## "):
            inside = heading is None or line[3:].strip() == heading
        elif inside and line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= {"-", ":", " "}:
                rows.append(cells)
    return rows


def code_names(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


@pytest.fixture(scope="module")
def app() -> Any:
    from service.app import create_app

    return create_app()


def test_every_route_is_documented(app: Any) -> None:
    from fastapi.routing import iter_route_contexts

    served = {(method, route.path) for route in iter_route_contexts(app.routes)
              for method in route.methods or () if method not in ("HEAD", "OPTIONS")}
    documented = {(method, path) for cells in table_rows(API.read_text()) if len(cells) > 1
                  for method in code_names(cells[0]) if method.isupper() for path in code_names(cells[1])
                  if path.startswith("/")}
    assert served - documented == set(), f"docs/API.md does not list {sorted(served - documented)}"
    assert documented - served == set(), f"docs/API.md lists routes the app does not have: {sorted(documented - served)}"


def test_request_fields_are_documented(app: Any) -> None:
    from service.schemas import JobCreate

    text = API.read_text()
    generate = {name for cells in table_rows(text, "POST /generate") for name in code_names(cells[0])}
    assert generate == set(JobCreate.model_fields), "docs/API.md, POST /generate: fields differ from JobCreate's"
    body = app.openapi()["paths"]["/edit"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = app.openapi()["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]["properties"]
    edit = {name for cells in table_rows(text, "POST /edit") for name in code_names(cells[0])}
    assert edit == set(form), "docs/API.md, POST /edit: fields differ from the route's form"


# ----- README and links --------------------------------------------------------------------------------------
def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move details to docs/"


def strip_code_blocks(text: str) -> str:
    """``text`` without fenced code blocks (their lines kept empty, so line numbers stay)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for line in strip_code_blocks(path.read_text()).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match[1])
            name, n = base, 0
            while name in found:  # GitHub numbers repeated headings
                n += 1
                name = f"{base}-{n}"
            found.add(name)
        found.update(re.findall(r'<a\s+(?:name|id)="([^"]+)"', line))
    return found


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<(?:img|a)\s[^>]*(?:src|href)=\"([^\"]+)\"")
DOCS = sorted({README, *REPO.glob("*.md"), *(REPO / "docs").glob("*.md")})


def links(path: Path) -> list[tuple[int, str]]:
    text = strip_code_blocks(path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    return [(number, markdown or html) for number, line in enumerate(text.splitlines(), 1)
            for markdown, html in LINK.findall(line)]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for number, target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{path.name}:{number}: {target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{path.name}:{number}: {target} (no heading #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_check_can_fail(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text('# Title\n\n[gone](missing.md) [here](#title) [not](#nowhere) `[code](x.md)` <img src="a.png">\n')
    targets = [target for _, target in links(page)]
    assert targets == ["missing.md", "#title", "#nowhere", "a.png"]
    assert "title" in anchors(page) and "nowhere" not in anchors(page)
    assert slug("Editing a real face (`POST /edit`)") == "editing-a-real-face-post-edit"
