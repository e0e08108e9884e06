"""The metric catalogue the ops tests check against: the source scan finds every metric the live registries
expose, the PromQL name extraction finds what it should (and an unknown name is reported), and docs/OPERATIONS.md
documents every exported metric."""

from __future__ import annotations

import importlib
import inspect

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from tests.ops.catalog import (
    OPERATIONS,
    REPO,
    defines_metrics,
    exported_families,
    exported_series,
    metric_names,
    normalize,
    product_sources,
    unknown_metrics,
)


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _no_argument_classes(module) -> list[type]:
    classes = []
    for value in vars(module).values():
        if not inspect.isclass(value) or value.__module__ != module.__name__:
            continue
        try:
            parameters = inspect.signature(value).parameters.values()
        except (TypeError, ValueError):
            continue
        if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
            classes.append(value)
    return classes


def live_families() -> dict[str, str]:
    """``{family name: type}`` from the registries the metric modules build: module-level registries, and those of
    the module's classes that need no argument (the API's and the worker's metrics objects). Collectors that read
    Redis at scrape time are left out (they need a connection); the source scan covers them."""
    families = {}
    for path in product_sources():
        if not defines_metrics(path):
            continue
        module = importlib.import_module(_module_name(path))
        registries = [v for v in vars(module).values() if isinstance(v, CollectorRegistry)]
        for cls in _no_argument_classes(module):
            instance = cls()
            registries += [v for v in vars(instance).values() if isinstance(v, CollectorRegistry)]
        for registry in registries:
            if registry is prometheus_client.REGISTRY:  # the process-wide default: not one of ours
                continue
            for metric in registry.collect():
                families[normalize(metric.name, metric.type)] = metric.type
    return families


def test_the_source_scan_finds_every_metric_the_registries_expose():
    live = live_families()
    assert len(live) >= 20, f"too few metrics in the live registries, is the import scan broken? {sorted(live)}"
    scanned = {name: family.kind for name, family in exported_families().items()}
    missing = {name: kind for name, kind in live.items() if scanned.get(name) != kind}
    assert not missing, f"exported but not found by tests/ops/catalog.py's scan (name: type): {missing}"


def test_every_component_exports_metrics():
    names = exported_series()
    for prefix in ("facegen_api_", "facegen_worker_", "facegen_webhook_", "facegen_queue_"):
        assert any(n.startswith(prefix) for n in names), f"no {prefix}* metric found"
    assert {"facegen_worker_jobs_total", "facegen_worker_phase_seconds_bucket", "facegen_redis_up",
            "facegen_worker_model_info", "facegen_api_requests_created"} <= names


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum by (le) (rate(facegen_worker_phase_seconds_bucket{phase="queue_wait"}[10m]))',
         {"facegen_worker_phase_seconds_bucket"}),
        ("max(facegen_redis_up) == 1 unless on() facegen_models_live", {"facegen_redis_up", "facegen_models_live"}),
        ('count(up{job=~"(.+/)?facegen-webhooks"} == 1) or vector(0)', {"up"}),
        ("sum by (stage) (rate(a_total[$__rate_interval])) / on() group_left() sum(rate(b_count[${interval}]))",
         {"a_total", "b_count"}),
        ("(x unless x offset 10m) and on(job, instance) (up offset 10m)", {"x", "up"}),
        ('histogram_quantile(0.9, sum without (instance) (rate(h_bucket{le!="+Inf"}[5m:1m]))) > 1e3',
         {"h_bucket"}),
        ("facegen_worker_model_info", {"facegen_worker_model_info"}),
        ("time() - process_start_time_seconds > bool 60", {"process_start_time_seconds"}),
    ],
)
def test_metric_names_of_an_expression(expr, expected):
    assert metric_names(expr) == expected


def test_an_unknown_metric_is_reported():
    """Negative control: a misspelt metric must be caught, so an empty report means something."""
    allowed = exported_series()
    exprs = {"good": "sum(rate(facegen_worker_images_total[5m]))",
             "bad": "sum(rate(facegen_worker_imagez_total[5m])) / sum(rate(facegen_worker_images_total[5m]))"}
    assert unknown_metrics(exprs, allowed) == {"bad": {"facegen_worker_imagez_total"}}


def test_operations_doc_lists_every_exported_metric():
    text = OPERATIONS.read_text()
    missing = sorted(f"{f.main_series} ({f.source})" for f in exported_families().values() if f"`{f.main_series}"
                     not in text)
    assert not missing, f"docs/OPERATIONS.md, Metrics, does not document: {missing}"
