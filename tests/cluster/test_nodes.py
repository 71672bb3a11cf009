"""The simulated nodes look like GPU nodes prepared by NVIDIA's GPU Operator."""

from __future__ import annotations

from typing import Any

import pytest

from localcluster import Cluster

pytestmark = pytest.mark.cluster

A100 = "NVIDIA-A100-SXM4-80GB"
H100 = "NVIDIA-H100-80GB-HBM3"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def nodes_by_name(cluster: Cluster) -> dict[str, dict[str, Any]]:
    return {n["metadata"]["name"]: n for n in cluster.kubectl_json("get", "nodes")["items"]}


def is_ready(node: dict[str, Any]) -> bool:
    conditions = node["status"].get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_kubectl_get_nodes_lists_the_simulated_nodes_and_the_real_one_ready(
    cluster: Cluster,
) -> None:
    table = cluster.kubectl("get", "nodes", "--no-headers").stdout.splitlines()
    rows = {line.split()[0]: line.split()[1] for line in table}
    assert rows == {
        "gpu-a100-0": "Ready",
        "gpu-a100-1": "Ready",
        "gpu-h100-0": "Ready",
        "cpu-0": "Ready",
        "real-0": "Ready",
    }


def test_the_real_node_runs_a_kubelet_with_containerd_and_advertises_gpus(
    cluster: Cluster,
) -> None:
    node = nodes_by_name(cluster)["real-0"]
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == cluster.toolchain.versions.kubernetes
    assert info["containerRuntimeVersion"].startswith("containerd://")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-L4"
    assert "kwok.x-k8s.io/node" not in node["metadata"].get("annotations", {})
    assert GPU_TAINT in node["spec"]["taints"]
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == "172.30.0.1"


@pytest.mark.parametrize(
    ("name", "product", "gpus"),
    [("gpu-a100-0", A100, 4), ("gpu-a100-1", A100, 4), ("gpu-h100-0", H100, 8)],
)
def test_gpu_node_has_capacity_labels_and_taint(
    cluster: Cluster, name: str, product: str, gpus: int
) -> None:
    node = nodes_by_name(cluster)[name]
    assert is_ready(node)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == str(gpus)
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(gpus)
    labels = node["metadata"]["labels"]
    assert labels["nvidia.com/gpu.present"] == "true"
    assert labels["nvidia.com/gpu.product"] == product
    assert labels["nvidia.com/gpu.count"] == str(gpus)
    assert int(labels["nvidia.com/gpu.memory"]) > 80_000
    assert node["spec"]["taints"] == [GPU_TAINT]


def test_cpu_node_has_no_gpus_and_no_taint(cluster: Cluster) -> None:
    node = nodes_by_name(cluster)["cpu-0"]
    assert is_ready(node)
    assert "nvidia.com/gpu" not in node["status"]["allocatable"]
    assert not any(key.startswith("nvidia.com/") for key in node["metadata"]["labels"])
    assert not node["spec"].get("taints")


def test_label_selector_finds_gpu_nodes_by_product(cluster: Cluster) -> None:
    found = cluster.kubectl(
        "get", "nodes", "-l", f"nvidia.com/gpu.product={A100}", "-o", "name"
    ).stdout.split()
    assert sorted(found) == ["node/gpu-a100-0", "node/gpu-a100-1"]
