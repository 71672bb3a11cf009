"""Deletion on the real control plane: nothing the operator needs to be up for, nothing it
brings back. The operator adds no finalizer (kopf keeps no state on our objects), so the
garbage collector takes the children through their owner references."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from localcluster import Cluster
from localcluster.operator import OperatorProcess
from support import DELETE, get, load_example, merged, wait_for

pytestmark = pytest.mark.cluster

MODELS_IN_NAMESPACE = 200


def cpu_model(name: str) -> dict[str, object]:
    manifest = merged(load_example("minimal.yaml"), {"spec": {"resources": {"gpu": DELETE}}})
    manifest["metadata"] = {"name": name}
    return manifest


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
