"""What the ops files may name: the metrics facegen exports, found in its source, and the metric names a PromQL
expression reads.

The exported metrics are read from the definitions themselves (``Counter("name", ...)``, ``GaugeMetricFamily(
"name", ...)``, …) in every first-party ``.py`` file that imports prometheus_client, wherever it lives, so moving
a module between packages changes nothing here. tests/ops/test_catalog.py checks the scan against the live
registries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OPERATIONS = REPO / "docs" / "OPERATIONS.md"
# Top-level folders that hold no product code (or no code at all).
NOT_PRODUCT = {"tests", "bench", "docs", "k8s", "docker", "requirements", "checkpoints", "data", "runs", "node_modules",
               "build", "dist", "venv"}

# Series Prometheus itself makes, not an exporter: target health and alert state.
PROMETHEUS_SERIES = {"up": "scrape target health", "ALERTS": "alert state"}

_DEFINITION = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary|Info|Enum"
    r"|CounterMetricFamily|GaugeMetricFamily|HistogramMetricFamily|SummaryMetricFamily|InfoMetricFamily"
    r"|StateSetMetricFamily|UnknownMetricFamily)\(\s*[\"']([a-zA-Z_:][a-zA-Z0-9_:]*)[\"']"
)
# What each kind of definition puts on /metrics (prometheus_client's text exposition).
_KIND = {
    "Counter": "counter", "CounterMetricFamily": "counter",
    "Gauge": "gauge", "GaugeMetricFamily": "gauge", "UnknownMetricFamily": "gauge",
    "Histogram": "histogram", "HistogramMetricFamily": "histogram",
    "Summary": "summary", "SummaryMetricFamily": "summary",
    "Info": "info", "InfoMetricFamily": "info",
    "Enum": "stateset", "StateSetMetricFamily": "stateset",
}


@dataclass(frozen=True)
class Family:
    """One metric family as prometheus_client names it (a counter without ``_total``, an info without ``_info``)."""

    name: str
    kind: str  # counter, gauge, histogram, summary, info, stateset
    source: str  # repository-relative path of its definition

    @property
    def series(self) -> set[str]:
        """The series names it exposes."""
        n = self.name
        return {
            "counter": {f"{n}_total", f"{n}_created"},
            "gauge": {n},
            "histogram": {f"{n}_bucket", f"{n}_sum", f"{n}_count", f"{n}_created"},
            "summary": {n, f"{n}_sum", f"{n}_count", f"{n}_created"},
            "info": {f"{n}_info"},
            "stateset": {n},
        }[self.kind]

    @property
    def main_series(self) -> str:
        """The name a reader looks for (the one documented): ``x_total``, ``x_info``, else the family name."""
        return {"counter": f"{self.name}_total", "info": f"{self.name}_info"}.get(self.kind, self.name)


def product_sources() -> list[Path]:
    """First-party ``.py`` files that import prometheus_client."""
    files = []
    for top in sorted(REPO.iterdir()):
        if not top.is_dir() or top.name.startswith(".") or top.name in NOT_PRODUCT:
            continue
        for path in sorted(top.rglob("*.py")):
            if any(part.startswith(".") for part in path.relative_to(REPO).parts):
                continue
            text = path.read_text(encoding="utf-8")
            if "prometheus_client" in text:
                files.append(path)
    return files


def defines_metrics(path: Path) -> bool:
    return _DEFINITION.search(path.read_text(encoding="utf-8")) is not None


def normalize(name: str, kind: str) -> str:
    """prometheus_client's family name for a definition: a counter's ``_total`` and an info's ``_info`` dropped."""
    if kind == "counter" and name.endswith("_total"):
        return name[: -len("_total")]
    if kind == "info" and name.endswith("_info"):
        return name[: -len("_info")]
    return name


def exported_families() -> dict[str, Family]:
    """Every metric family facegen defines, by family name."""
    families: dict[str, Family] = {}
    for path in product_sources():
        for match in _DEFINITION.finditer(path.read_text(encoding="utf-8")):
            kind = _KIND[match.group(1)]
            name = normalize(match.group(2), kind)
            families[name] = Family(name, kind, str(path.relative_to(REPO)))
    return families


def exported_series() -> set[str]:
    return {series for family in exported_families().values() for series in family.series}


# ----- PromQL ------------------------------------------------------------------------------------------------------

PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right",
                   "offset", "atan2", "inf", "nan", "start", "end"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_IDENTIFIER = re.compile(r"(?<![\w:.])[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (Grafana variables allowed) reads: identifiers that are not a function
    or aggregation call, a keyword, a label name in matchers or in a by/on/… list, or part of a duration."""
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("", text)
    text = _MATCHERS.sub("{}", text)
    text = _RANGE.sub("[]", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(0)
        if re.match(r"\s*\(", text[match.end():]) or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def unknown_metrics(exprs: dict[str, str], allowed: set[str]) -> dict[str, set[str]]:
    """``{where: names}`` for each expression that reads a metric outside ``allowed``."""
    found = {where: metric_names(expr) - allowed for where, expr in exprs.items()}
    return {where: names for where, names in found.items() if names}
