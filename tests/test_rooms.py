"""The rooms of the code and what each may import, read from the source (every import, lazy ones too).

| room | what it holds | may import of ours | third-party packages from |
|---|---|---|---|
| ``facegen.contract`` | job spec, connection policy, artifact store, fair queue | itself | core + ``api`` and ``worker`` both |
| ``facegen.model`` | networks, diffusion math, pipeline, checkpoints, images | itself | core + ``worker`` |
| ``worker`` | the GPU worker | contract, model | core + ``worker`` |
| ``service`` | the API and the webhook sender | contract | core + ``api`` |
| ``training.data`` | CelebA reader, synthetic faces | model | core + ``train`` |
| trainers (``training.*``) | trainer loop, ``train_*``, runtime, stats | model, data | core + ``train`` |
| ``training.evaluation`` | judges, evaluate*, transitions, visualize | model, data, trainers | core + ``eval`` |
| ``training.__main__`` | the ``python -m training`` CLI | everything | core + ``eval`` |

The third-party column is what makes each image's install set enough: the worker image installs the core and the
``worker`` extra (``requirements/worker.lock`` + torch), so nothing the worker process can import may need more.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
OURS = ("facegen", "service", "worker", "training")

TRAINERS = "training (trainers)"
RULES: dict[str, tuple[set[str], set[str]]] = {  # room: (rooms of ours it may import, extras it may draw on)
    "facegen.contract": ({"facegen.contract"}, {"api-and-worker"}),
    "facegen.model": ({"facegen.model"}, {"worker"}),
    "worker": ({"worker", "facegen.contract", "facegen.model"}, {"worker"}),
    "service": ({"service", "facegen.contract"}, {"api"}),
    "training.data": ({"training.data", "facegen.model"}, {"train"}),
    TRAINERS: ({TRAINERS, "training.data", "facegen.model"}, {"train"}),
    "training.evaluation": ({"training.evaluation", TRAINERS, "training.data", "facegen.model"}, {"eval"}),
    "training.__main__": (set(), {"eval"}),  # the CLI may import every room
}


def room_of(module: str) -> str:
    """The room a dotted module name of ours belongs to."""
    for room in ("facegen.contract", "facegen.model", "training.data", "training.evaluation", "training.__main__"):
        if module == room or module.startswith(room + "."):
            return room
    top = module.split(".")[0]
    if top == "training":
        return TRAINERS
    if top == "facegen":
        return "facegen"  # the package's own __init__
    return top


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute dotted names; relative imports resolved; lazy imports included; not
    the optional ones, tried under ``except ImportError``)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    optional = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.Try) and any(
        isinstance(handler.type, ast.Name) and handler.type.id in ("ImportError", "ModuleNotFoundError")
        for handler in node.handlers) for statement in node.body for inner in ast.walk(statement)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module)
    return found


def sources() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for top in OURS for path in sorted((REPO / top).rglob("*.py"))}


def allowed_distributions(extras: set[str]) -> set[str]:
    """Canonical names of the core requirements plus those of ``extras`` (``facegen[...]`` expanded)."""
    pending = {extra for name in extras for extra in (("api", "worker") if name == "api-and-worker" else (name,))}
    names = {canonicalize_name(Requirement(line).name) for line in PROJECT["dependencies"]}
    seen: set[str] = set()
    while pending:
        extra = pending.pop()
        seen.add(extra)
        for line in PROJECT["optional-dependencies"][extra]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == canonicalize_name(PROJECT["name"]):
                pending.update(set(requirement.extras) - seen)
            else:
                names.add(canonicalize_name(requirement.name))
    if "api-and-worker" in extras:  # the contract must run in both images: only what both install
        names &= allowed_distributions({"api"}) & allowed_distributions({"worker"})
    return names


@functools.cache
def distributions_of(module: str) -> set[str]:
    """The installed distributions that provide the top-level import name of ``module`` (empty for the stdlib)."""
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top == "__future__":
        return set()
    providers = importlib.metadata.packages_distributions().get(top)
    assert providers, f"no installed distribution provides {top!r}"
    return {canonicalize_name(name) for name in providers}


SOURCES = sources()


@pytest.mark.parametrize("room", sorted(RULES))
def test_room_imports_only_what_its_rules_allow(room: str) -> None:
    rooms_allowed, extras = RULES[room]
    distributions = allowed_distributions(extras)
    broken = []
    for module, imported in SOURCES.items():
        if room_of(module) != room:
            continue
        for target in sorted(imported):
            if target.split(".")[0] in OURS:
                if rooms_allowed and room_of(target) not in rooms_allowed | {"facegen"}:
                    broken.append(f"{module} imports {target} (room {room_of(target)})")
            elif not distributions_of(target) & distributions and distributions_of(target):
                broken.append(f"{module} imports {target} ({sorted(distributions_of(target))} not in {sorted(extras)})")
    assert not broken, "\n".join(broken)


def test_every_module_of_ours_has_a_room() -> None:
    assert {room_of(module) for module in SOURCES} == set(RULES) | {"facegen"}


def worker_closure() -> set[str]:
    """Every module of ours the worker process can import, starting at ``python -m worker``."""
    pending, seen = ["worker.__main__", "worker.jobs"], set()
    while pending:
        module = pending.pop()
        if module in seen or module not in SOURCES:
            continue
        seen.add(module)
        for target in SOURCES[module]:
            pending.extend(candidate for candidate in (target, target.rsplit(".", 1)[0]) if candidate in SOURCES)
    return seen


def test_the_worker_extra_lists_exactly_what_the_worker_imports() -> None:
    """No training-only package in the worker image, and nothing in it that the worker never imports."""
    closure = worker_closure()
    assert not {module for module in closure if module.split(".")[0] in ("service", "training")}
    imported = set().union(*(distributions_of(target) for module in closure for target in SOURCES[module]
                             if target.split(".")[0] not in OURS))
    core = {canonicalize_name(Requirement(line).name) for line in PROJECT["dependencies"]}
    listed = allowed_distributions({"worker"}) - core
    assert listed == imported - core


def test_a_rule_breach_is_seen() -> None:
    """The check itself: a trainer import inside the served model is reported."""
    module = "facegen.model.pipeline"
    saved = SOURCES[module]
    SOURCES[module] = saved | {"training.trainer", "tqdm"}
    try:
        with pytest.raises(AssertionError, match="training.trainer.*\n.*tqdm"):
            test_room_imports_only_what_its_rules_allow("facegen.model")
    finally:
        SOURCES[module] = saved


RQ_ADAPTER = "worker.jobs"  # the worker's one contact with RQ: the job function, the RQ worker, the batch's adapter


def rq_importers(room: str) -> set[str]:
    """The modules of ``room`` that import ``rq`` or one of its modules."""
    return {module for module, imported in SOURCES.items() if room_of(module) == room
            and any(target == "rq" or target.startswith("rq.") for target in imported)}


def test_only_the_rq_adapter_imports_rq_in_the_worker() -> None:
    """The batch steps reach RQ through the adapter only, so an RQ release can break one module at most."""
    assert rq_importers("worker") == {RQ_ADAPTER}
