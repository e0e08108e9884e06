"""The Grafana dashboard (k8s/monitoring/facegen-dashboard.json): provisionable as it is (no fixed id, a
Prometheus data source variable every query uses), laid out without overlaps, every query valid PromQL that reads
only metrics facegen exports, and shipped unchanged in the ConfigMap k8s/monitoring renders."""

from __future__ import annotations

import json
import re

import kubernetes_validate
import pytest
import yaml

from tests.ops.catalog import PROMETHEUS_SERIES, REPO, exported_series, unknown_metrics
from tests.ops.tools import kustomize, run_promtool

DASHBOARD = REPO / "k8s" / "monitoring" / "facegen-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What each part of the issue asks the dashboard to show, as a metric one of its queries must read.
REQUIRED = {
    "request rate and latency by route": {"facegen_api_requests_total", "facegen_api_request_duration_seconds_bucket"},
    "queue depth and wait": {"facegen_queue_depth", "facegen_worker_phase_seconds_bucket"},
    "jobs by status": {"facegen_worker_jobs_total", "facegen_api_jobs_ended_total"},
    "images per second": {"facegen_worker_images_total"},
    "batch size": {"facegen_worker_batch_images_bucket"},
    "worker liveness": {"up", "facegen_models_live"},
    "precision fallbacks": {"facegen_worker_precision_fallbacks_total"},
    "webhook deliveries and backlog": {"facegen_webhook_deliveries_total", "facegen_webhook_attempt_duration_seconds_sum"},
    "artifact store errors": {"facegen_worker_failures_total"},
}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def queries(dashboard: dict) -> dict[str, str]:
    """``{"<panel title> / <refId>": expr}`` of every query."""
    return {f"{panel['title']} / {target['refId']}": target["expr"]
            for panel in all_panels(dashboard) for target in panel.get("targets", [])}


def test_dashboard_is_provisionable(dashboard):
    assert dashboard.get("id") is None, "a provisioned dashboard must not carry a database id"
    assert dashboard["uid"] == "facegen-overview" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["name"] == "datasource" and variable["query"] == "prometheus"
    assert "__inputs" not in dashboard, "an export-for-sharing dashboard cannot be provisioned from a file"


def test_every_panel_queries_the_datasource_variable(dashboard):
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
        assert panel.get("description"), f"{panel['title']}: no description"


def test_panels_do_not_overlap(dashboard):
    taken: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_queries_read_only_exported_metrics(dashboard):
    unknown = unknown_metrics(queries(dashboard), exported_series() | set(PROMETHEUS_SERIES))
    assert not unknown, f"queries read metrics facegen does not export: {unknown}"


def test_dashboard_shows_what_operations_need(dashboard):
    read = " ".join(queries(dashboard).values())
    for what, metrics in REQUIRED.items():
        missing = {m for m in metrics if not re.search(rf"\b{re.escape(m)}\b", read)}
        assert not missing, f"{what}: no panel reads {missing}"


def test_queries_are_valid_promql(dashboard, tmp_path):
    """promtool parses each query as a recording rule (Grafana's interval variables replaced by a duration)."""
    rules = [{"record": f"dashboard:query_{i}", "expr": re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr)}
             for i, expr in enumerate(queries(dashboard).values())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run_promtool("check", "rules", path)
    assert proc.returncode == 0, f"promtool check rules (dashboard queries) failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def config_map() -> dict:
    (found,) = [o for o in kustomize(DASHBOARD.parent) if o["kind"] == "ConfigMap"]
    return found


def test_configmap_ships_the_dashboard_for_grafanas_sidecar(config_map):
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "facegen"
    assert json.loads(config_map["data"][DASHBOARD.name]) == json.loads(DASHBOARD.read_text())
    kubernetes_validate.validate(config_map, "1.32.0", strict=True)
