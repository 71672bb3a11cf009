"""The Grafana dashboard against Grafana's own schema: every field we write survives parsing
into grafana-foundation-sdk's models (generated from Grafana's dashboard schema), so no
field is misspelt, misplaced or of the wrong type."""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.cog import encoder
from grafana_foundation_sdk.models import dashboard

from chart_support import DASHBOARD


def missing(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Paths of ``ours`` that ``theirs`` lacks or holds differently."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [path or "/"]
        return [p for k, v in ours.items() for p in missing(v, theirs.get(k), f"{path}/{k}")]
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(theirs) != len(ours):
            return [path]
        return [
            p
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
            for p in missing(a, b, f"{path}/{i}")
        ]
    return [] if ours == theirs else [path]


def test_the_dashboard_matches_grafanas_schema() -> None:
    ours = json.loads(DASHBOARD.read_text())
    parsed = dashboard.Dashboard.from_json(ours)
    theirs = json.loads(encoder.JSONEncoder(sort_keys=True).encode(parsed))
    assert missing(ours, theirs) == []
    assert ours["uid"] == "modeldeploy-models"
    titles = {p["title"] for p in ours["panels"]}
    assert {
        "Latency p50 and p99 per model",
        "Canary against stable: p99",
        "Replicas against GPUs",
    } <= titles


def test_the_check_catches_a_misspelt_field() -> None:
    ours = json.loads(DASHBOARD.read_text())
    ours["panels"][0]["gridPosition"] = ours["panels"][0].pop("gridPos")
    theirs = json.loads(encoder.JSONEncoder().encode(dashboard.Dashboard.from_json(ours)))
    assert "/panels/0/gridPosition" in missing(ours, theirs)
