"""promtool (Debian's prometheus package) parses every PromQL expression of the chart's
alerts and dashboard."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_support import alert_groups, dashboard_queries

pytestmark = pytest.mark.prometheus


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: apt-get install prometheus (.ci/run does)")
    return found


def check_rules(groups: list[dict[str, Any]], path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(yaml.safe_dump({"groups": groups}))
    return subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )


def test_promtool_accepts_the_alert_rules(tmp_path: Path) -> None:
    groups = alert_groups()
    alerts = [r["alert"] for g in groups for r in g["rules"]]
    assert set(alerts) == {
        "ModelDeploymentRolloutFailed",
        "ModelDriftHigh",
        "ModelShadowDisagreement",
        "ModelDeployClientQueriesOffDistribution",
        "ModelLatencySLOBurn",
        "ModeldeployOperatorDown",
        "ModeldeployOperatorNotReconciling",
    }
    result = check_rules(groups, tmp_path / "alerts.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts)} rules found" in result.stdout


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 8
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(queries.values())
    ]
    result = check_rules([{"name": "dashboard", "rules": rules}], tmp_path / "dashboard.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_broken_expression(tmp_path: Path) -> None:
    # The check above can fail: a query with a syntax error does not pass.
    broken = [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(x[5m])"}]}]
    assert check_rules(broken, tmp_path / "broken.yaml").returncode != 0
