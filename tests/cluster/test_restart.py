"""Restarting the operator against unchanged ModelDeployments writes nothing.

A level-based operator must reach the same conclusion from the same world: ten restarts
against twenty settled ModelDeployments, one canary waiting at a manual step after an earlier
promotion (a canary Deployment, a history, a rollout status) and one autoscaled by an HPA,
change no resourceVersion (of the ModelDeployments, their Deployments and Services; the
HPA's spec), emit no Event and send no mutating request at all. Every start replays
every object as an event (kopf's and our watches list first). A status field the API server
pruned would be written again at every pass: this is the schema's round-trip guard too.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import Cluster
from localcluster.operator import OperatorProcess, metric_sum
from support import DELETE, get, load_example, merged, wait_for

pytestmark = pytest.mark.cluster

COUNT = 20
RESTARTS = 10
CANARY = "canary-at-a-manual-step"
AUTOSCALED = "autoscaled-by-an-hpa"
WRITE_VERBS = "APPLY|PATCH|POST|PUT|DELETE"


def resource_versions(cluster: Cluster, namespace: str) -> dict[str, str]:
    items = cluster.kubectl_json("get", "modeldeployments,deployments,services", "-n", namespace)[
        "items"
    ]
    found = {
        f"{i['kind']}/{i['metadata']['name']}": i["metadata"]["resourceVersion"] for i in items
    }
    # kube-controller-manager writes the HPA's status; the operator owns its spec (the HPA
    # keeps no generation to compare).
    for hpa in cluster.kubectl_json("get", "hpa", "-n", namespace)["items"]:
        found[f"HPA/{hpa['metadata']['name']}"] = json.dumps(hpa["spec"], sort_keys=True)
    return found


def event_count(cluster: Cluster, namespace: str) -> int:
    items = cluster.kubectl_json("get", "events", "-n", namespace)["items"]
    return sum(1 for e in items if e.get("source", {}).get("component") == "modeldeploy-operator")


def all_settled(cluster: Cluster, namespace: str) -> bool:
    """Every plain one Available, the canary waiting at its manual step, each observed."""
    items: list[dict[str, Any]] = cluster.kubectl_json("get", "md", "-n", namespace)["items"]
    status = {i["metadata"]["name"]: i.get("status", {}) for i in items}
    return (
        len(items) == COUNT + 2
        and all(
            status[i["metadata"]["name"]].get("observedGeneration") == i["metadata"]["generation"]
            for i in items
        )
        and all(s.get("phase") == "Available" for n, s in status.items() if n != CANARY)
        and (status[CANARY].get("canary") or {}).get("weight") == 50
        and bool(status[CANARY].get("history"))
    )


def special(base: dict[str, Any]) -> list[dict[str, Any]]:
    """The canary (version 2 promoted, version 3 waiting at 50 %) and the autoscaled one."""
    steps = [{"weight": 50, "pause": "manual"}, {"weight": 100}]
    canary = merged(
        base,
        {
            "metadata": {"name": CANARY},
            "spec": {"replicas": 2, "rollout": {"strategy": "Canary", "steps": steps}},
        },
    )
    scaling = {
        "engine": "hpa",
        "minReplicas": 1,
        "maxReplicas": 3,
        "metrics": [{"type": "InFlightPerReplica", "target": 4}],
    }
    autoscaled = merged(base, {"metadata": {"name": AUTOSCALED}, "spec": {"autoscaling": scaling}})
    return [canary, autoscaled]


def set_version(cluster: Cluster, namespace: str, version: str) -> None:
    patch = json.dumps({"spec": {"model": {"version": version}}})
    cluster.kubectl("patch", "md", CANARY, "-n", namespace, "--type=merge", "-p", patch)


def canary_of(cluster: Cluster, namespace: str) -> dict[str, Any]:
    found = get(cluster, namespace, "md", CANARY) or {}
    canary: dict[str, Any] = found.get("status", {}).get("canary") or {}
    return canary


def written(process: OperatorProcess) -> dict[str, float]:
    """The process's mutating requests so far, by their labels (the Lease's aside)."""
    return {
        series: value
        for series, value in process.metrics().items()
        if series.startswith("modeldeploy_api_requests_total{")
        and value > 0
        and re.search(f'verb="({WRITE_VERBS})"', series)
        and 'kind="Lease"' not in series
    }


def idle(process: OperatorProcess) -> bool:
    """No write of the process for two resyncs."""
    before = written(process)
    time.sleep(2 * process.resync_seconds)
    return written(process) == before


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
        manifests += special(base)
        cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(manifests))
        # The canary's history: version 2 promoted by hand, then version 3 waits at 50 %.
        wait_for(
            "version 1 observed",
            lambda: (
                (get(cluster, namespace, "md", CANARY) or {}).get("status", {}).get("phase")
                == "Available"
            ),
            120,
        )
        set_version(cluster, namespace, "2")
        wait_for(
            "the canary at 50 %", lambda: canary_of(cluster, namespace).get("weight") == 50, 60
        )
        cluster.kubectl(
            "annotate", "md", CANARY, "-n", namespace, "serving.modeldeploy.io/command=promote"
        )
        wait_for("version 2 promoted", lambda: not canary_of(cluster, namespace), 60)
        set_version(cluster, namespace, "3")
        wait_for("everything settled", lambda: all_settled(cluster, namespace), 120)
        # And the operator idle: no write for two resyncs (a write decided just before the
        # status looked settled would otherwise land on the first restart).
        wait_for("the operator idle", lambda: idle(own), 60)
        own.stop()

        versions = resource_versions(cluster, namespace)
        events = event_count(cluster, namespace)
        # Each plain one: itself, a Deployment, a Service; the canary: a second Deployment;
        # the autoscaled one: an HPA.
        assert len(versions) == 3 * (COUNT + 2) + 2, sorted(versions)
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
                    >= 2 * (COUNT + 2)
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
            assert writes == 0, f"restart {restart}: {written(own)}"
            assert own.stop() == 0
            assert resource_versions(cluster, namespace) == versions, f"restart {restart}"
            assert event_count(cluster, namespace) == events, f"restart {restart}"
    finally:
        own.stop()
        operator.start()
