"""The alerting rules (k8s/monitoring/facegen-rules.yml): valid for promtool, unit-tested with `promtool test rules`
(tests/ops/promtool/), delivered unchanged to Docker Compose's Prometheus and to Kubernetes as a PrometheusRule,
reading only metrics facegen exports, each alert labelled, annotated and documented with a runbook.

promtool comes from the Debian package ``prometheus`` (``make test`` installs it: scripts/ensure_promtool.sh).
"""

from __future__ import annotations

import re

import pytest
import yaml

from scripts import prometheus_rule
from tests.ops.catalog import (
    OPERATIONS,
    PROMETHEUS_SERIES,
    REPO,
    exported_series,
    unknown_metrics,
)
from tests.ops.tools import kustomize, run_promtool

RULES = REPO / "k8s" / "monitoring" / "facegen-rules.yml"
PROMETHEUS_RULE = REPO / "k8s" / "monitoring" / "prometheusrule.yaml"
MONITORING = REPO / "k8s" / "monitoring"
RULE_TESTS = REPO / "tests" / "ops" / "promtool" / "facegen-rules.test.yml"
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus.yml"
COMPOSE_FILE = REPO / "docker-compose.yml"
MOUNTED_RULES = "/etc/prometheus/facegen-rules.yml"
SEVERITIES = {"critical", "warning"}


def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
            if "alert" in rule]


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


# ----- promtool ---------------------------------------------------------------------------------------------------


def test_promtool_checks_the_rules():
    proc = run_promtool("check", "rules", RULES)
    assert proc.returncode == 0, f"promtool check rules failed:\n{proc.stdout}\n{proc.stderr}"
    assert f"SUCCESS: {len(alerts())} rules found" in proc.stdout, proc.stdout


def test_promtool_unit_tests_pass():
    proc = run_promtool("test", "rules", RULE_TESTS)
    assert proc.returncode == 0, f"promtool test rules failed:\n{proc.stdout}\n{proc.stderr}"
    assert "SUCCESS" in proc.stdout, proc.stdout


def test_promtool_unit_tests_catch_a_changed_threshold(tmp_path):
    """Negative control: with one threshold moved, the same unit tests must fail."""
    rules = RULES.read_text()
    assert rules.count(") > 0.1\n") == 1, "the job failure threshold this control moves is gone; pick another"
    (tmp_path / "rules.yml").write_text(rules.replace(") > 0.1\n", ") > 0.5\n"))
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["rule_files"] = ["rules.yml"]
    (tmp_path / "rules.test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = run_promtool("test", "rules", "rules.test.yml", cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert "FacegenJobFailureRateHigh" in proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_silent_case():
    cases: dict[str, dict[str, int]] = {}
    for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            counts = cases.setdefault(case["alertname"], {"firing": 0, "silent": 0})
            counts["firing" if case.get("exp_alerts") else "silent"] += 1
    for rule in alerts():
        counts = cases.get(rule["alert"], {"firing": 0, "silent": 0})
        assert counts["firing"] and counts["silent"], f"{rule['alert']}: unit test cases {counts}"
    assert set(cases) <= {rule["alert"] for rule in alerts()}, "a unit test names an alert that does not exist"


# ----- what the rules say -----------------------------------------------------------------------------------------


def test_every_alert_is_labelled_annotated_and_has_a_runbook():
    headings = {github_anchor(line.lstrip("#")) for line in OPERATIONS.read_text().splitlines()
                if line.startswith("#")}
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in alerts():
        name = rule["alert"]
        assert name.startswith("Facegen"), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/OPERATIONS.md", f"{name}: runbook_url {annotations['runbook_url']}"
        assert anchor == name.lower() and anchor in headings, f"{name}: no section #{anchor} in docs/OPERATIONS.md"


def test_rules_read_only_exported_metrics():
    allowed = exported_series() | set(PROMETHEUS_SERIES)
    exprs = {rule["alert"]: rule["expr"] for rule in alerts()}
    assert not unknown_metrics(exprs, allowed), unknown_metrics(exprs, allowed)


# ----- one source, two deliveries ---------------------------------------------------------------------------------


def test_prometheus_rule_is_generated_from_the_rules_file():
    assert PROMETHEUS_RULE.read_text() == prometheus_rule.render(RULES.read_text()), (
        "k8s/monitoring/prometheusrule.yaml is stale: run python -m scripts.prometheus_rule"
    )
    resource = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert resource["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


@pytest.fixture(scope="module")
def monitoring() -> list[dict]:
    return kustomize(MONITORING)


def test_kustomization_renders_the_rules_in_the_facegen_namespace(monitoring):
    (rule,) = [o for o in monitoring if o["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "facegen"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert re.fullmatch(r"(\d+[smhdwy])+", r.get("for", "0s")), r  # the CRD's duration pattern
    assert {o["kind"] for o in monitoring} == {"PrometheusRule", "ConfigMap"}


def test_compose_prometheus_loads_the_same_file():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == [MOUNTED_RULES]
    prometheus = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["prometheus"]
    mounts = [v for v in prometheus["volumes"] if isinstance(v, str) and v.split(":")[1] == MOUNTED_RULES]
    assert mounts, f"docker-compose.yml does not mount the rules at {MOUNTED_RULES}"
    source = mounts[0].split(":")[0]
    assert (REPO / source).resolve() == RULES, mounts[0]
    assert mounts[0].endswith(":ro")


def test_promtool_checks_the_compose_prometheus_config(tmp_path):
    """docker/prometheus.yml with its rules where the container mounts them (here: beside a copy)."""
    config = PROMETHEUS_CONFIG.read_text().replace(MOUNTED_RULES, str(RULES))
    (tmp_path / "prometheus.yml").write_text(config)
    proc = run_promtool("check", "config", tmp_path / "prometheus.yml")
    assert proc.returncode == 0, f"promtool check config failed:\n{proc.stdout}\n{proc.stderr}"
    assert f"SUCCESS: {len(alerts())} rules found" in proc.stdout, proc.stdout
