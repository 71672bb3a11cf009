"""The Helm chart's rendered manifests, alert rules and dashboard queries, for tests."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from localcluster import Toolchain

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "modeldeploy"
DASHBOARD = CHART / "files" / "dashboard.json"
# Grafana's variables, replaced by what a user would see with "All" selected.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$namespace": ".*", "$modeldeployment": ".*"}


def render(*values: str, namespace: str = "modeldeploy-system") -> list[dict[str, Any]]:
    """``helm template`` of the chart (release ``modeldeploy``) with ``--set`` values."""
    helm = str(Toolchain.locate().path("helm"))
    command = [helm, "template", "modeldeploy", str(CHART), "-n", namespace]
    for value in values:
        command += ["--set", value]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def alert_groups() -> list[dict[str, Any]]:
    """The PrometheusRule's groups, as a Prometheus rule file holds them."""
    rule = next(
        d for d in render("monitoring.prometheusRule=true") if d["kind"] == "PrometheusRule"
    )
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def dashboard_queries(variables: dict[str, str] | None = None) -> dict[str, str]:
    """Every panel query of the dashboard (title and refId -> PromQL), variables replaced."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in (variables or GRAFANA_VARIABLES).items():
                expr = expr.replace(name, value)
            found[f"{panel['title']} [{target['refId']}]"] = expr
    return found


SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?")
FUNCTIONS = {
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "increase",
    "by",
    "and",
    "on",
    "or",
    "absent",
    "histogram_quantile",
    "le",
    "unless",
    "without",
}


def alert_selectors() -> list[str]:
    """The vector selectors of the alert expressions (``metric{labels}``), de-duplicated."""
    found: dict[str, None] = {}
    for group in alert_groups():
        for rule in group["rules"]:
            expr = re.sub(r"\bby \([^)]*\)|on \(\)|\[[0-9]+[smh]\]", "", rule["expr"])
            for name, labels in SELECTOR.findall(expr):
                if name not in FUNCTIONS and not name[0].isdigit():
                    found[name + labels] = None
    return list(found)
