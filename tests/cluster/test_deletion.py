"""Deletion on the real control plane: nothing the operator needs to be up for, nothing it
brings back. The operator adds no finalizer (kopf keeps no state on our objects), so the
garbage collector takes the children through their owner references."""

from __future__ import annotations

import functools
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from localcluster import Cluster
from localcluster.operator import OperatorProcess, free_port, metric_sum
from support import cpu_model, every_kind_of_child, get, merged, start_scoped_operator, wait_for

pytestmark = pytest.mark.cluster

MODELS_IN_NAMESPACE = 200


def children(cluster: Cluster, namespace: str, kind: str) -> list[str]:
    listed = cluster.kubectl_json("get", kind, "-n", namespace)["items"]
    return sorted(item["metadata"]["name"] for item in listed)


def test_deleted_while_the_operator_is_down_its_children_go_and_nothing_comes_back(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(cpu_model("resnet50")))
    wait_for(
        "its Deployment and Service",
        lambda: (
            children(cluster, namespace, "deployments") == ["resnet50-stable"]
            and children(cluster, namespace, "services") == ["resnet50"]
        ),
        timeout=60,
    )
    md = get(cluster, namespace, "md", "resnet50") or {}
    assert not md["metadata"].get("finalizers")  # nothing holds a deletion for the operator
    operator.stop()
    try:
        cluster.kubectl("delete", "md", "resnet50", "-n", namespace, "--wait=true", timeout=30)
        wait_for(
            "the garbage collector to take the children",
            lambda: (
                not children(cluster, namespace, "deployments")
                and not children(cluster, namespace, "services")
            ),
            timeout=60,
        )
    finally:
        operator.start()
    # Several resyncs later, still nothing: the operator recreates nothing it no longer owns.
    time.sleep(3 * operator.resync_seconds)
    assert children(cluster, namespace, "deployments") == []
    assert children(cluster, namespace, "services") == []
    assert get(cluster, namespace, "md", "resnet50") is None


def test_a_namespace_with_200_modeldeployments_is_gone_within_a_minute(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    """No finalizer ever added: the namespace controller deletes everything at once, the
    operator's watches see the deletions and write nothing back."""
    namespace = f"many-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    models = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [cpu_model(f"m{i:03d}") for i in range(MODELS_IN_NAMESPACE)],
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(models), timeout=120)
    wait_for(
        f"{MODELS_IN_NAMESPACE} Deployments",
        lambda: len(children(cluster, namespace, "deployments")) == MODELS_IN_NAMESPACE,
        timeout=240,
    )
    listed = cluster.kubectl_json("get", "md", "-n", namespace)["items"]
    assert not [m for m in listed if m["metadata"].get("finalizers")]
    started = time.monotonic()
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    wait_for(
        "the namespace gone",
        lambda: cluster.kubectl("get", "namespace", namespace, check=False).returncode != 0,
        timeout=60,
    )
    gone_after = time.monotonic() - started
    print(f"namespace with {MODELS_IN_NAMESPACE} ModelDeployments gone in {gone_after:.1f} s")


def test_every_kind_of_child_goes_with_its_modeldeployment_within_10s(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    gateway_api: None,
    keda_crds: None,
) -> None:
    """ModelDeployments that have each kind of child the operator makes (Deployments and
    Services, an HPA, a KEDA ScaledObject, an HTTPRoute with its track Services) are deleted
    with the operator up: the garbage collector takes every built-in child within 10 s (the
    custom kinds once it has discovered them: at once when their CRDs are older), no finalizer
    holds anything, and no Event says an owner reference was wrong. (The query-budget
    ConfigMap, made only once Prometheus has counted calls, carries the same owner reference:
    builders/labels.child_metadata.)"""
    specs = every_kind_of_child()
    for manifest in specs.values():
        cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))
    kinds = "deployments,services,horizontalpodautoscalers,scaledobjects,httproutes"

    def owned() -> set[str]:
        listed = cluster.kubectl_json(
            "get", kinds, "-n", namespace, "-l", "app.kubernetes.io/managed-by=modeldeploy"
        )["items"]
        return {f"{i['kind']}/{i['metadata']['name']}" for i in listed}

    expected = {
        "HorizontalPodAutoscaler/hpa",
        "ScaledObject/keda",
        "HTTPRoute/routed",
        *(f"Deployment/{name}-stable" for name in specs),
        *(f"Service/{name}" for name in specs),
    }
    wait_for("every kind of child", lambda: expected <= owned(), timeout=60)
    listed = cluster.kubectl_json("get", "md", "-n", namespace)["items"]
    assert not [m for m in listed if m["metadata"].get("finalizers")]

    started = time.monotonic()
    cluster.kubectl("delete", "md", "--all", "-n", namespace, "--wait=false")
    core = ("Deployment/", "Service/", "HorizontalPodAutoscaler/")
    wait_for(
        "the built-in children gone",
        lambda: not [c for c in owned() if c.startswith(core)],
        timeout=10,
    )
    # Of a custom kind the garbage collector learns through discovery, which it renews every
    # 30 s: a CRD installed just before (this test alone) can take that long.
    wait_for("every child gone", lambda: not owned(), timeout=40)
    print(f"every child gone {time.monotonic() - started:.1f} s after the delete")
    events = cluster.kubectl_json("get", "events", "-n", namespace)["items"]
    assert not [e for e in events if e["reason"] == "OwnerRefInvalidNamespace"]


def test_deleted_mid_rollout_with_passes_scheduled_it_goes_and_they_are_dropped(
    cluster: Cluster, own_operator: list[OperatorProcess], namespace: str, tmp_path: Path
) -> None:
    """Reliability case 19. What kopf's timers and daemons are elsewhere, scheduled passes
    are here: a canary waits out a 10-minute step, another re-checks its analysis every 2 s
    (Prometheus is not there: inconclusive, so it keeps asking). Both are deleted with the
    operator up: they go at once (no finalizer to remove), their children follow, their
    scheduled passes are dropped, and nothing fails or comes back."""
    process = start_scoped_operator(own_operator, cluster, namespace, tmp_path / "operator.log")
    analysis = {
        "interval": "2s",
        "prometheus": {"url": f"http://127.0.0.1:{free_port()}"},
        "metrics": [{"name": "errors", "builtin": "ErrorRatio", "max": 0.01}],
    }
    rollouts = {
        "timed": {"strategy": "Canary", "steps": [{"weight": 50, "pause": "10m"}, {"weight": 100}]},
        "analysed": {
            "strategy": "Canary",
            "steps": [{"weight": 50}, {"weight": 100}],
            "analysis": analysis,
        },
    }
    for name, rollout in rollouts.items():
        manifest = merged(cpu_model(name), {"spec": {"replicas": 2, "rollout": rollout}})
        cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))

    def status(name: str) -> dict[str, Any]:
        found: dict[str, Any] = (get(cluster, namespace, "md", name) or {}).get("status", {})
        return found

    def available(name: str) -> bool:
        return status(name).get("phase") == "Available"

    for name in rollouts:
        wait_for(f"{name} Available", functools.partial(available, name))
        patch = json.dumps({"spec": {"model": {"version": "2"}}})
        cluster.kubectl("patch", "md", name, "-n", namespace, "--type=merge", "-p", patch)
    wait_for(
        "the timed step's pods ready (its 10 minutes counting)",
        lambda: (status("timed").get("canary") or {}).get("readySince"),
        timeout=60,
    )
    wait_for(
        "an inconclusive analysis",
        lambda: [
            a for a in status("analysed").get("analysis", []) if a["result"] == "Inconclusive"
        ],
        timeout=60,
    )
    assert metric_sum(process.metrics(), "modeldeploy_operator_workqueue_delayed") == 2
    errors = metric_sum(process.metrics(), "modeldeploy_reconcile_errors_total")

    started = time.monotonic()
    cluster.kubectl("delete", "md", "--all", "-n", namespace, "--wait=true", timeout=10)
    wait_for(
        "the children gone",
        lambda: not children(cluster, namespace, "deployments,services"),
        timeout=10,
    )
    print(f"deleted with their children in {time.monotonic() - started:.1f} s")
    wait_for(
        "the scheduled passes dropped",
        lambda: metric_sum(process.metrics(), "modeldeploy_operator_workqueue_delayed") == 0,
        timeout=5,
    )
    # Three analysis intervals and a resync later: nothing came back, nothing failed.
    time.sleep(max(6.0, process.resync_seconds))
    assert children(cluster, namespace, "deployments,services") == []
    assert cluster.kubectl_json("get", "md", "-n", namespace)["items"] == []
    assert metric_sum(process.metrics(), "modeldeploy_reconcile_errors_total") == errors
    assert process.running
    assert "Traceback" not in process.log_path.read_text()
