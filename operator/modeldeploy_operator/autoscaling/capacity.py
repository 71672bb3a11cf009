"""How many replicas the GPUs a ModelDeployment's placement can reach would hold: pure.

A node is reachable when it is schedulable, carries every label of the pod's nodeSelector
and every NoSchedule/NoExecute taint is tolerated. Its free GPUs are its allocatable
``nvidia.com/gpu`` minus what other pods on it request; our own pods' GPUs count as ours.
Each node holds ``free // per_replica`` replicas (a replica never spans nodes). Affinity and
topology spread constraints are not evaluated: they can only lower the number.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")

Json = Mapping[str, Any]


def quantity_count(value: Any) -> int:
    """An integer extended resource count ("4", 4); anything else counts as 0."""
    try:
        return int(str(value))
    except ValueError:
        return 0


def tolerates(tolerations: Sequence[Json], taint: Json) -> bool:
    if taint.get("effect") not in BLOCKING_EFFECTS:
        return True
    for toleration in tolerations:
        if toleration.get("effect") not in (None, "", taint.get("effect")):
            continue
        if toleration.get("operator") == "Exists":
            if toleration.get("key") in (None, "", taint.get("key")):
                return True
        elif toleration.get("key") == taint.get("key") and toleration.get("value", "") == taint.get(
            "value", ""
        ):
            return True
    return False


def reachable(node: Json, node_selector: Mapping[str, str], tolerations: Sequence[Json]) -> bool:
    if node.get("spec", {}).get("unschedulable"):
        return False
    labels = node.get("metadata", {}).get("labels") or {}
    if any(labels.get(key) != value for key, value in node_selector.items()):
        return False
    return all(tolerates(tolerations, t) for t in node.get("spec", {}).get("taints") or [])


def pod_gpus(pod: Json) -> int:
    total = 0
    for container in pod.get("spec", {}).get("containers") or []:
        resources = container.get("resources") or {}
        asked = (resources.get("limits") or {}).get(GPU_RESOURCE) or (
            resources.get("requests") or {}
        ).get(GPU_RESOURCE)
        total += quantity_count(asked or 0)
    return total


def holds_resources(pod: Json) -> bool:
    return pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")


def replicas_that_fit(
    nodes: Sequence[Json],
    pods: Sequence[Json],
    pod_spec: Json,
    ours: Callable[[Json], bool],
) -> int:
    """Replicas of ``pod_spec`` (the Deployment's pod template spec) the cluster holds."""
    per_replica = pod_gpus({"spec": pod_spec})
    if per_replica <= 0:
        raise ValueError("the pod asks for no GPUs")
    selector = pod_spec.get("nodeSelector") or {}
    tolerations = pod_spec.get("tolerations") or []
    used: dict[str, int] = {}
    for pod in pods:
        node = pod.get("spec", {}).get("nodeName")
        if node and holds_resources(pod) and not ours(pod):
            used[node] = used.get(node, 0) + pod_gpus(pod)
    fit = 0
    for node in nodes:
        if not reachable(node, selector, tolerations):
            continue
        allocatable = quantity_count(
            (node.get("status", {}).get("allocatable") or {}).get(GPU_RESOURCE, 0)
        )
        free = allocatable - used.get(node["metadata"]["name"], 0)
        fit += max(free, 0) // per_replica
    return fit
