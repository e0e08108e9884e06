"""pyproject.toml and the hashed locks (requirements/*.lock, written by ``make lock``) must agree.

Every requirement of an install target (the core plus the extra, ``facegen[...]`` expanded) has a pinned,
hashed entry in that target's lock whose version satisfies the requirement's specifier. torch is the one
exception, by design: it is pinned exactly in pyproject.toml and kept out of the locks, because its wheel differs
between CPU and CUDA hosts.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
OUTSIDE_THE_LOCK = {"torch"}
TARGETS = ["dev", "api", "worker"]  # each extra with a lock: make installs dev, the images api and worker
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;\s*([^\\]+?))?\s*\\?$")


def requirements_of(extra: str) -> list[Requirement]:
    """The core requirements plus ``extra``'s, with ``facegen[...]`` self-references expanded."""
    found: list[Requirement] = [Requirement(line) for line in PROJECT["dependencies"]]
    pending, seen = [extra], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in PROJECT["optional-dependencies"][name]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == canonicalize_name(PROJECT["name"]):
                pending.extend(requirement.extras)
            else:
                found.append(requirement)
    return found


def read_lock(target: str) -> dict[str, list[tuple[Version, int]]]:
    """``{name: [(version, number of hashes), ...]}`` (a name appears more than once under different markers)."""
    pins: dict[str, list[tuple[Version, int]]] = {}
    current: list[tuple[Version, int]] | None = None
    for line in (REPO / "requirements" / f"{target}.lock").read_text().splitlines():
        match = PIN.match(line)
        if match:
            current = pins.setdefault(canonicalize_name(match[1]), [])
            current.append((Version(match[2]), 0))
        elif line.strip().startswith("--hash=sha256:") and current:
            version, hashes = current[-1]
            current[-1] = (version, hashes + 1)
    return pins


@pytest.mark.parametrize("target", TARGETS)
def test_every_requirement_has_a_hashed_pin_that_satisfies_it(target: str) -> None:
    pins = read_lock(target)
    assert pins, f"requirements/{target}.lock pins nothing"
    unhashed = [name for name, entries in pins.items() for _, hashes in entries if hashes == 0]
    assert not unhashed, f"pins without hashes in {target}.lock: {unhashed}"
    problems = []
    for requirement in requirements_of(target):
        name = canonicalize_name(requirement.name)
        if name in OUTSIDE_THE_LOCK:
            assert name not in pins, f"{name} must stay out of {target}.lock"
            continue
        if name not in pins:
            problems.append(f"{requirement} is not in requirements/{target}.lock")
            continue
        for version, _ in pins[name]:
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{target}.lock pins {name}=={version}, outside {requirement}")
    assert not problems, "run `make lock`:\n" + "\n".join(problems)


def test_the_locks_pin_shared_packages_alike() -> None:
    dev = read_lock("dev")
    for target in ("api", "worker"):
        for name, entries in read_lock(target).items():
            assert sorted(v for v, _ in entries) == sorted(v for v, _ in dev.get(name, [])), (target, name)


def test_torch_is_pinned_exactly() -> None:
    torch = [Requirement(line) for extra in PROJECT["optional-dependencies"].values() for line in extra
             if canonicalize_name(Requirement(line).name) == "torch"]
    assert torch, "torch is no longer a requirement: drop it from OUTSIDE_THE_LOCK"
    for requirement in torch:
        (spec,) = requirement.specifier
        assert spec.operator == "==", requirement


@pytest.mark.parametrize(("path", "lock"), [("Makefile", "requirements/dev.lock"),
                                            ("docker/api.Dockerfile", "requirements/api.lock"),
                                            ("docker/worker.Dockerfile", "requirements/worker.lock")])
def test_installs_come_from_the_hashed_lock(path: str, lock: str) -> None:
    text = (REPO / path).read_text()
    assert re.search(rf"--require-hashes --no-deps -r {re.escape(lock)}\b", text), path
