"""The ConfigMap of clients over their query budget, read by every replica's sidecar."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from modeldeploy_operator.api.v1alpha1 import ModelDeployment
from modeldeploy_operator.builders.deployment import BUDGETS_KEY
from modeldeploy_operator.builders.labels import (
    budget_configmap_name,
    child_metadata,
    common_labels,
)


def exhausted_clients(md: ModelDeployment, used: Mapping[str, float]) -> dict[str, float]:
    """The clients (keys' salted hashes) whose calls over the window reached the budget."""
    budget = md.spec.monitoring.auth.query_budget if md.spec.monitoring.auth else None
    if budget is None:
        return {}
    return {
        client: round(count)
        for client, count in sorted(used.items())
        if client not in ("other", "unknown") and count >= budget.queries
    }


def build_budget_configmap(md: ModelDeployment, exhausted: Mapping[str, float]) -> dict[str, Any]:
    document = {"exhausted": dict(sorted(exhausted.items()))}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(md, budget_configmap_name(md), common_labels(md)),
        "data": {BUDGETS_KEY: json.dumps(document, sort_keys=True)},
    }
