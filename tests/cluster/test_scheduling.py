"""The real scheduler places GPU pods by product, GPU count and taint."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from localcluster import Cluster
from support import wait_for

pytestmark = pytest.mark.cluster

H100 = "NVIDIA-H100-80GB-HBM3"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_NODES = {"gpu-a100-0", "gpu-a100-1", "gpu-h100-0"}


def deployment(
    name: str,
    *,
    replicas: int = 1,
    gpus: int = 0,
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    resources: dict[str, Any] = {"requests": {"cpu": "100m", "memory": "64Mi"}}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": str(gpus)}
    pod_spec: dict[str, Any] = {
        "containers": [
            {"name": "main", "image": "registry.invalid/noop:1", "resources": resources}
        ],
        "nodeSelector": node_selector or {},
        "tolerations": tolerations or [],
    }
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def create(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))


def pods(cluster: Cluster, namespace: str, app: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.kubectl_json(
        "get", "pods", "-n", namespace, "-l", f"app={app}"
    )["items"]
    return items


def scheduling_failures(cluster: Cluster, namespace: str) -> list[str]:
    events = cluster.kubectl_json(
        "get", "events", "-n", namespace, "--field-selector", "reason=FailedScheduling"
    )["items"]
    return [e["message"] for e in events]


def test_gpu_pod_lands_on_the_requested_product_and_becomes_available(
    cluster: Cluster, namespace: str
) -> None:
    create(
        cluster,
        namespace,
        deployment(
            "h100",
            gpus=1,
            node_selector={"nvidia.com/gpu.product": H100},
            tolerations=[GPU_TOLERATION],
        ),
    )
    cluster.kubectl(
        "wait",
        "-n",
        namespace,
        "--for=condition=Available",
        "deployment/h100",
        "--timeout=60s",
        timeout=90,
    )
    [pod] = pods(cluster, namespace, "h100")
    assert pod["spec"]["nodeName"] == "gpu-h100-0"
    assert pod["status"]["phase"] == "Running"
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "True"


def test_more_gpus_than_any_node_has_stays_pending(cluster: Cluster, namespace: str) -> None:
    create(cluster, namespace, deployment("greedy", gpus=9, tolerations=[GPU_TOLERATION]))
    messages = wait_for("a FailedScheduling event", lambda: scheduling_failures(cluster, namespace))
    assert any("nvidia.com/gpu" in m for m in messages), messages
    [pod] = pods(cluster, namespace, "greedy")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def test_pods_without_the_toleration_never_land_on_gpu_nodes(
    cluster: Cluster, namespace: str
) -> None:
    # Six small pods with no placement at all: the scheduler would spread them over every
    # node if the GPU taint did not keep them on the only untainted node.
    create(cluster, namespace, deployment("plain", replicas=6))
    cluster.kubectl(
        "wait",
        "-n",
        namespace,
        "--for=condition=Available",
        "deployment/plain",
        "--timeout=60s",
        timeout=90,
    )
    placed = {pod["spec"]["nodeName"] for pod in pods(cluster, namespace, "plain")}
    assert placed == {"cpu-0"}

    # Asking for a GPU product without tolerating the taint is never scheduled.
    create(
        cluster,
        namespace,
        deployment("untolerated", node_selector={"nvidia.com/gpu.product": H100}),
    )
    messages = wait_for("a FailedScheduling event", lambda: scheduling_failures(cluster, namespace))
    # Kubernetes 1.36 counts the nodes per reason without naming the taint: the three
    # simulated GPU nodes and the real node are the tainted ones.
    assert any("4 node(s) had untolerated taint" in m for m in messages), messages
    [pod] = pods(cluster, namespace, "untolerated")
    assert pod["status"]["phase"] == "Pending"
    assert pod["spec"].get("nodeName") not in GPU_NODES
