"""Query budgets across replicas: the operator sums the sidecars' counts (a scripted
Prometheus here; the real one in tests/realnode/test_door.py) into the ConfigMap every pod
reads, writes it only when the list changes, and keeps the last list when it cannot sum."""

from __future__ import annotations

import json
from typing import Any

from middle.harness import NAMESPACE, Harness, model
from modeldeploy_operator.metrics.prometheus import ProviderError

BUDGETED: dict[str, Any] = {
    "monitoring": {
        "auth": {"apiKeySecret": {"name": "keys"}, "queryBudget": {"queries": 5, "window": "1h"}}
    }
}


def listed(h: Harness) -> dict[str, float] | None:
    found = h.api.get("v1", "ConfigMap", NAMESPACE, "iris-query-budgets")
    if found is None:
        return None
    exhausted: dict[str, float] = json.loads(found["data"]["exhausted.json"])["exhausted"]
    return exhausted


def configmap_writes(h: Harness, since: int) -> int:
    return len([c for c in h.api.calls[since:] if c.kind == "ConfigMap" and c.verb == "apply"])


def test_keys_over_budget_are_listed_for_every_pod_and_cleared() -> None:
    h = Harness.create(model(**BUDGETED))
    h.metrics.vectors = {"client": {"key-a": 6, "key-b": 2, "other": 40, "unknown": 9}}
    outcome = h.reconcile()
    assert listed(h) == {"key-a": 6}  # "other" and "unknown" are not keys
    assert outcome is not None
    assert outcome.requeue_after is not None
    assert outcome.requeue_after <= 30, "budgets are summed again within 30 s"
    assert any("modeldeploy_runtime_client_budget_used" in q for _, q in h.metrics.queries)
    pod = h.deployment("stable")
    assert pod is not None
    volumes = {v["name"]: v for v in pod["spec"]["template"]["spec"]["volumes"]}
    assert volumes["query-budgets"]["configMap"] == {
        "name": "iris-query-budgets",
        "optional": True,
    }

    since = len(h.api.calls)
    h.clock.advance(30)
    h.reconcile()
    assert configmap_writes(h, since) == 0, "an unchanged list is not written again"

    h.metrics.vectors = {"client": {"key-a": 4}}  # the window moved on
    h.clock.advance(30)
    h.reconcile()
    assert listed(h) == {}


def test_without_a_sum_the_last_list_stands() -> None:
    h = Harness.create(model(**BUDGETED))
    h.metrics.vectors = {"client": {"key-a": 5}}
    h.reconcile()
    assert listed(h) == {"key-a": 5}
    h.metrics.answer = ProviderError("Prometheus is down")
    since = len(h.api.calls)
    h.clock.advance(30)
    h.reconcile()
    assert configmap_writes(h, since) == 0
    assert listed(h) == {"key-a": 5}


def test_no_budget_no_query_and_no_configmap() -> None:
    h = Harness.create(model())
    h.reconcile()
    assert listed(h) is None
    assert not [q for _, q in h.metrics.queries if "budget" in q]
