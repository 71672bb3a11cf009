"""Which nodes' model caches hold which archives, as node labels: a pure decision.

A pod whose fetcher filled (or used) the node cache reports the archive's digest; the node
then gets ``cache.modeldeploy.io/sha256.<hex>``, which pods pinned to that digest prefer
(``builders.deployment.pod_affinity``): a second replica, a restart or a rollback lands where
the model already is. Labels are added once per operator process and never removed: an
evicted archive leaves a stale label, which costs a download, never correctness.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from modeldeploy_operator.builders.labels import cache_label
from modeldeploy_operator.status import dig, fetch_report


def labels_to_add(
    pods: Iterable[Mapping[str, Any]], done: frozenset[tuple[str, str]]
) -> set[tuple[str, str]]:
    """(node, label) pairs the pods' fetch reports call for and ``done`` does not have."""
    wanted = set()
    for pod in pods:
        report = fetch_report(pod) or {}
        node = dig(pod, "spec", "nodeName")
        if node and report.get("cache") and isinstance(report.get("digest"), str):
            wanted.add((str(node), cache_label(report["digest"])))
    return wanted - done
