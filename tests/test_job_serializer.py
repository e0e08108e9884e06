"""Jobs are JSON, never pickle (facegen/contract/job_serializer.py): the serializer refuses what is not strict JSON,
and every RQ object our code builds passes it. The second is read from the source, as tests/test_rooms.py reads
imports: each call in service/, worker/, facegen/, bench/ and scripts/ that builds an RQ queue, job, registry or
worker, or fetches a job (RQ's own classes, or a subclass of ours such as ``FairQueue``; also ``Job.fetch`` handed
to a call such as ``run_in_threadpool``), must name ``serializer=``: RQ's default is pickle."""

from __future__ import annotations

import ast
import importlib
import inspect
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from facegen.contract.job_serializer import JOB_SERIALIZER, UnreadableJobData

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("service", "worker", "facegen", "bench", "scripts")


def sources() -> Iterator[Path]:
    for room in SCANNED:
        yield from sorted((REPO / room).rglob("*.py"))


def rq_imports(tree: ast.AST) -> dict[str, Any]:
    """The names a module imports from rq, with what they name."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rq":
            module = importlib.import_module(node.module)
            found.update({alias.asname or alias.name: getattr(module, alias.name) for alias in node.names})
    return found


def our_subclasses(trees: dict[Path, ast.AST]) -> dict[str, Any]:
    """Class name -> the RQ class it derives from, for our classes built on RQ's (``FairQueue``, the workers)."""
    found: dict[str, Any] = {}
    for _ in range(3):  # a subclass of a subclass of ours
        for tree in trees.values():
            names = {**found, **rq_imports(tree)}
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    bases = [names[base.id] for base in node.bases
                             if isinstance(base, ast.Name) and inspect.isclass(names.get(base.id))]
                    if bases:
                        found[node.name] = bases[0]
    return found


def takes_serializer(target: Any) -> bool:
    """Whether calling ``target`` (an RQ class or one of its methods) accepts ``serializer``."""
    if inspect.isclass(target):
        return any("serializer" in inspect.signature(klass.__init__).parameters
                   for klass in target.__mro__ if klass.__module__.split(".")[0] == "rq")
    return callable(target) and "serializer" in inspect.signature(target).parameters


def resolve(node: ast.expr, names: dict[str, Any]) -> tuple[str, Any] | None:
    """``Name`` or ``Name.attribute`` resolved through ``names``: (its source text, the object)."""
    if isinstance(node, ast.Name) and node.id in names:
        return node.id, names[node.id]
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names:
        return f"{node.value.id}.{node.attr}", getattr(names[node.value.id], node.attr, None)
    return None


def sites_in(tree: ast.AST, names: dict[str, Any]) -> Iterator[tuple[int, str, bool]]:
    """Each call in ``tree`` that builds or fetches RQ objects: (line, what it calls, whether it names
    ``serializer``)."""
    for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
        passes = any(keyword.arg == "serializer" for keyword in call.keywords)
        handed = [arg for arg in call.args if isinstance(arg, ast.Attribute)]  # e.g. run_in_threadpool(Job.fetch)
        for callee in (call.func, *handed):
            found = resolve(callee, names)
            if found is not None and takes_serializer(found[1]):
                yield call.lineno, found[0], passes


def rq_sites() -> list[tuple[str, int, str, bool]]:
    """:func:`sites_in` over the scanned rooms, with each site's path."""
    trees = {path: ast.parse(path.read_text()) for path in sources()}
    subclasses = our_subclasses(trees)
    return [(str(path.relative_to(REPO)), *site) for path, tree in trees.items()
            for site in sites_in(tree, {**subclasses, **rq_imports(tree)})]


def test_every_rq_queue_job_registry_and_worker_we_build_passes_the_json_serializer() -> None:
    sites = rq_sites()
    missing = [f"{path}:{line}: {what}(...) without serializer=" for path, line, what, passes in sites if not passes]
    assert not missing, "RQ's default serializer is pickle; pass JOB_SERIALIZER:\n" + "\n".join(missing)
    seen = {(path, what) for path, _, what, _ in sites}  # the scan sees the sites we know of
    assert {("worker/jobs.py", "FairQueue"), ("worker/jobs.py", "FacegenWorker"), ("worker/jobs.py", "Job.fetch_many"),
            ("service/redis_clients.py", "Queue"), ("service/job_ops.py", "Job.fetch"),
            ("service/webhooks/__main__.py", "DeliveryWorker"), ("service/webhooks/sender.py", "Job.fetch")} <= seen


def test_the_scan_catches_a_forgotten_serializer() -> None:
    tree = ast.parse("from rq import Queue, Retry\nfrom rq.job import Job\n"
                     "Queue('q', connection=c)\nrun_in_threadpool(Job.fetch, 'id', connection=c)\n"
                     "Queue('q', connection=c, serializer=s)\nJob.key_for('id')\nRetry(max=2)\n")
    assert list(sites_in(tree, rq_imports(tree))) == [(3, "Queue", False), (4, "Job.fetch", False), (5, "Queue", True)]


def test_json_in_and_out_and_nothing_else() -> None:
    value = ["worker.jobs.generate", None, [{"seed": 1, "guidance_scale": 2.5, "label": "smiling"}], {}]
    assert JOB_SERIALIZER.loads(JOB_SERIALIZER.dumps(value)) == value
    for stored in (pickle.dumps(value), b"\x80\x04N.", b'{"a": NaN}', b"[Infinity]", b"\xff\xfe", b""):
        with pytest.raises(UnreadableJobData):
            JOB_SERIALIZER.loads(stored)
    with pytest.raises(ValueError):
        JOB_SERIALIZER.dumps({"guidance_scale": float("nan")})
    with pytest.raises(TypeError):
        JOB_SERIALIZER.dumps({"image": b"bytes are not JSON"})
