"""The simulated cluster's shape: what the issue and GPU feature discovery ask for."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from localcluster.nodes import GPU_TAINT, default_nodes, node_manifest

ROOT = Path(__file__).resolve().parents[2]


def test_default_topology() -> None:
    gpus = Counter((n.gpu.product if n.gpu else None, n.gpu_count) for n in default_nodes())
    assert gpus == {
        ("NVIDIA-A100-SXM4-80GB", 4): 2,
        ("NVIDIA-H100-80GB-HBM3", 8): 1,
        (None, 0): 1,
    }


def test_gpu_node_manifest() -> None:
    spec = next(n for n in default_nodes() if n.name == "gpu-h100-0")
    node = node_manifest(spec)
    labels = node["metadata"]["labels"]
    assert labels["nvidia.com/gpu.present"] == "true"
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.count"] == "8"
    assert labels["nvidia.com/gpu.memory"] == "81559"
    assert node["spec"]["taints"] == [GPU_TAINT]
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert node["status"]["allocatable"] == node["status"]["capacity"]
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"


def test_cpu_node_manifest_has_no_gpu_traits() -> None:
    spec = next(n for n in default_nodes() if n.gpu is None)
    node = node_manifest(spec)
    assert "taints" not in node["spec"]
    assert "nvidia.com/gpu" not in node["status"]["capacity"]
    assert not [k for k in node["metadata"]["labels"] if k.startswith("nvidia.com/")]


def test_manifests_do_not_share_mutable_state() -> None:
    first, second = (node_manifest(n) for n in default_nodes()[:2])
    first["spec"]["taints"][0]["effect"] = "NoExecute"
    first["status"]["capacity"]["cpu"] = "1"
    assert second["spec"]["taints"][0]["effect"] == "NoSchedule"
    assert second["status"]["allocatable"]["cpu"] == "64"


def test_kind_config_has_the_same_gpu_workers_as_the_local_cluster() -> None:
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    roles = Counter(node["role"] for node in config["nodes"])
    assert roles == {"control-plane": 1, "worker": len(default_nodes())}
    kind_gpus = sorted(
        (n["labels"]["nvidia.com/gpu.product"], n["labels"]["nvidia.com/gpu.count"])
        for n in config["nodes"]
        if "nvidia.com/gpu.product" in n.get("labels", {})
    )
    local_gpus = sorted((n.gpu.product, str(n.gpu_count)) for n in default_nodes() if n.gpu)
    assert kind_gpus == local_gpus
    for node in config["nodes"]:
        if node.get("labels", {}).get("nvidia.com/gpu.present") == "true":
            assert "nvidia.com/gpu, value: present, effect: NoSchedule" in str(
                node["kubeadmConfigPatches"]
            )
