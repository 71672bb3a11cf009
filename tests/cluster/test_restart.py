"""Restarting the operator against unchanged ModelDeployments writes nothing.

A level-based operator must reach the same conclusion from the same world: five restarts
against twenty settled ModelDeployments change no resourceVersion (of the ModelDeployments or
their children), emit no Event and send no mutating request at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import Cluster
from localcluster.operator import OperatorProcess, metric_sum
from support import DELETE, load_example, merged, wait_for

pytestmark = pytest.mark.cluster

COUNT = 20
RESTARTS = 5
WRITE_VERBS = "APPLY|PATCH|POST|PUT|DELETE"


def resource_versions(cluster: Cluster, namespace: str) -> dict[str, str]:
    items = cluster.kubectl_json("get", "modeldeployments,deployments,services", "-n", namespace)[
        "items"
    ]
    return {f"{i['kind']}/{i['metadata']['name']}": i["metadata"]["resourceVersion"] for i in items}


def event_count(cluster: Cluster, namespace: str) -> int:
    items = cluster.kubectl_json("get", "events", "-n", namespace)["items"]
    return sum(1 for e in items if e.get("source", {}).get("component") == "modeldeploy-operator")


def all_available(cluster: Cluster, namespace: str) -> bool:
    items: list[dict[str, Any]] = cluster.kubectl_json("get", "md", "-n", namespace)["items"]
    return len(items) == COUNT and all(
        i.get("status", {}).get("phase") == "Available"
        and i["status"].get("observedGeneration") == i["metadata"]["generation"]
        for i in items
    )


def test_restarts_cause_no_writes_and_no_events(
    cluster: Cluster, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    operator.stop()  # this test's operator watches only its namespace
    own = OperatorProcess(
        cluster, tmp_path / "operator.log", extra_args=(f"--namespace={namespace}",)
    )
    try:
        own.start()
        # CPU-only, so that twenty fit beside the eight A100s of the local cluster.
        base = merged(load_example("minimal.yaml"), {"spec": {"resources": {"gpu": DELETE}}})
        manifests = [
            merged(
                base,
                {"metadata": {"name": f"model-{i:02d}"}, "spec": {"model": {"name": f"model_{i}"}}},
            )
            for i in range(COUNT)
        ]
        cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(manifests))
        wait_for(
            "every ModelDeployment to be Available", lambda: all_available(cluster, namespace), 120
        )
        own.stop()

        versions = resource_versions(cluster, namespace)
        events = event_count(cluster, namespace)
        assert len(versions) == 3 * COUNT
        assert events >= COUNT  # each became Ready once

        for restart in range(RESTARTS):
            own.start()
            # Each start reconciles everything from the initial listing, then again on resync.
            wait_for(
                "two reconciles of every ModelDeployment",
                lambda: (
                    metric_sum(
                        own.metrics(),
                        "modeldeploy_reconcile_duration_seconds_count",
                        result="success",
                    )
                    >= 2 * COUNT
                ),
                timeout=60,
            )
            # The Lease's renewals are the election's heartbeat, not writes to the world.
            writes = metric_sum(
                own.metrics(),
                "modeldeploy_api_requests_total",
                verb=WRITE_VERBS,
                kind="(?!Lease$).*",
            )
            assert writes == 0, f"restart {restart}: {writes} mutating requests"
            assert own.stop() == 0
            assert resource_versions(cluster, namespace) == versions, f"restart {restart}"
            assert event_count(cluster, namespace) == events, f"restart {restart}"
    finally:
        own.stop()
        operator.start()
