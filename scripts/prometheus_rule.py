"""Write k8s/monitoring/prometheusrule.yaml from k8s/monitoring/facegen-rules.yml: the same rule groups, text and
comments included, in a PrometheusRule (monitoring.coreos.com/v1) for the Prometheus Operator. The plain rules
file is the one source; edit it, then regenerate.

    python -m scripts.prometheus_rule           # write the PrometheusRule
    python -m scripts.prometheus_rule --check   # exit 1 (and say so) when the file is not what would be written
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "k8s" / "monitoring" / "facegen-rules.yml"
PROMETHEUS_RULE = REPO / "k8s" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from k8s/monitoring/facegen-rules.yml by `python -m scripts.prometheus_rule`: edit that file, then
# regenerate (tests/ops/test_alert_rules.py fails while the two differ). The namespace comes from the kustomization.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: facegen
  labels:
    app.kubernetes.io/name: facegen
    app.kubernetes.io/component: monitoring
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule for a plain rules file: its leading comment block dropped (it describes the source), the
    rest (``groups:`` onwards) indented under ``spec:``."""
    lines = rules_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")), None)
    if start is None or not lines[start].startswith("groups:"):
        raise ValueError(f"{RULES.relative_to(REPO)}: expected `groups:` after the leading comments")
    body = "".join(f"  {line}\n" if line.strip() else "\n" for line in lines[start:])
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.prometheus_rule", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file is stale")
    args = parser.parse_args(argv)
    expected = render(RULES.read_text())
    target = PROMETHEUS_RULE.relative_to(REPO)
    if args.check:
        if not PROMETHEUS_RULE.is_file() or PROMETHEUS_RULE.read_text() != expected:
            print(f"{target} is stale: run python -m scripts.prometheus_rule", file=sys.stderr)
            return 1
        return 0
    PROMETHEUS_RULE.write_text(expected)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
