"""The hpa and keda engines: the objects they generate are accepted by the real API server
(KEDA's CRDs from its published module), target the ModelDeployment's scale subresource,
and go away when the engine changes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from localcluster import Cluster
from localcluster.operator import OperatorProcess
from rollout_support import md_status
from support import condition, get, load_example, merged, wait_for

pytestmark = pytest.mark.cluster

SCALING: dict[str, Any] = {
    "minReplicas": 1,
    "maxReplicas": 5,
    "prometheus": {"url": "http://prometheus.monitoring:9090"},
    "metrics": [
        {"type": "InFlightPerReplica", "target": 4},
        {"type": "RPSPerReplica", "target": "12.5"},
        {"type": "P99Latency", "target": "250ms"},
        {"type": "QueueTime", "target": "20ms"},
        {"type": "GPUUtilization", "target": 80},
        {"type": "CPUUtilization", "target": 70},
    ],
    "behavior": {"scaleDownStabilization": "2m", "maxScaleUpStep": 2},
}


def apply(cluster: Cluster, namespace: str, scaling: dict[str, Any] | None) -> None:
    manifest = merged(load_example("minimal.yaml"), {"spec": {"resources": {"cpu": "2"}}})
    if scaling is not None:
        manifest["spec"]["autoscaling"] = scaling
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))


def test_the_hpa_engine_drives_the_scale_subresource_and_keda_replaces_it(
    cluster: Cluster, operator: OperatorProcess, namespace: str, keda_crds: None
) -> None:
    apply(cluster, namespace, {**SCALING, "engine": "hpa"})
    wait_for("the HPA", lambda: get(cluster, namespace, "hpa", "resnet50") is not None, 20)
    hpa = get(cluster, namespace, "hpa", "resnet50")
    assert hpa is not None
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "ModelDeployment"
    assert [m["type"] for m in hpa["spec"]["metrics"]] == [
        "Pods",
        "Pods",
        "External",
        "Pods",
        "Pods",
        "ContainerResource",
    ]
    # kube-controller-manager's HPA controller reads the ModelDeployment's scale subresource
    # (there is no metrics API here, so it cannot go further).
    wait_for(
        "the HPA controller to read the scale subresource",
        lambda: (
            (condition(get(cluster, namespace, "hpa", "resnet50"), "AbleToScale") or {}).get(
                "reason"
            )
            == "SucceededGetScale"
        ),
        timeout=60,
    )
    # What the HPA does when it decides: write spec.replicas through the scale subresource.
    cluster.kubectl("scale", "md", "resnet50", "-n", namespace, "--replicas=3")
    wait_for(
        "3 replicas",
        lambda: (
            (get(cluster, namespace, "deployment", "resnet50-stable") or {})["spec"]["replicas"]
            == 3
        ),
        timeout=20,
    )
    assert md_status(cluster, namespace)["autoscaling"]["engine"] == "hpa"
    # No second writer of the count, so nothing to oscillate: through several resyncs the
    # HPA's count stays, and the API server's audit log has no write of the operator to the
    # ModelDeployment but its status (no spec, no scale subresource).
    time.sleep(3 * operator.resync_seconds)
    assert (get(cluster, namespace, "deployment", "resnet50-stable") or {})["spec"]["replicas"] == 3
    writes = [
        (e["verb"], e["objectRef"].get("subresource", ""))
        for e in cluster.audit_events()
        if e["userAgent"].startswith("modeldeploy-operator/")
        and e["objectRef"].get("resource") == "modeldeployments"
        and e["objectRef"].get("namespace") == namespace
        and e["verb"] not in ("get", "list", "watch")
    ]
    assert writes, "the operator wrote no status"
    assert {subresource for _, subresource in writes} == {"status"}, writes

    apply(cluster, namespace, {**SCALING, "engine": "keda"})
    wait_for("the ScaledObject", lambda: get(cluster, namespace, "scaledobject", "resnet50"), 20)
    wait_for("the HPA gone", lambda: get(cluster, namespace, "hpa", "resnet50") is None, 20)
    scaled = get(cluster, namespace, "scaledobject", "resnet50")
    assert scaled is not None
    triggers = scaled["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["prometheus"] * 5 + ["cpu"]
    assert 'modeldeployment="resnet50"' in triggers[0]["metadata"]["query"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "resnet50"

    apply(cluster, namespace, None)
    wait_for(
        "the ScaledObject gone",
        lambda: get(cluster, namespace, "scaledobject", "resnet50") is None,
        20,
    )
    assert "autoscaling" not in md_status(cluster, namespace)


def test_keda_without_a_prometheus_url_is_reported(
    cluster: Cluster, operator: OperatorProcess, namespace: str, keda_crds: None
) -> None:
    apply(cluster, namespace, {**SCALING, "engine": "keda", "prometheus": None})
    wait_for(
        "ApplyFailed",
        lambda: (
            (condition(get(cluster, namespace, "md", "resnet50"), "Degraded") or {}).get("reason")
            == "ApplyFailed"
        ),
        timeout=20,
    )
    degraded = condition(get(cluster, namespace, "md", "resnet50"), "Degraded")
    assert degraded is not None
    message = degraded["message"]
    assert "spec.autoscaling.prometheus.url" in message
