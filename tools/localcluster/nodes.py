"""The simulated nodes of the local cluster, as pure data.

GPU nodes look like nodes that NVIDIA's GPU Operator has prepared: the labels GPU feature
discovery sets (``nvidia.com/gpu.present``, ``.product``, ``.count``, ``.memory``, ...), the
``nvidia.com/gpu`` extended resource the device plugin advertises, and the
``nvidia.com/gpu=present:NoSchedule`` taint that keeps ordinary pods off GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT: dict[str, str] = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"


@dataclass(frozen=True)
class Gpu:
    """A GPU model as GPU feature discovery labels it."""

    product: str
    memory_mib: int
    family: str


@dataclass(frozen=True)
class NodeSpec:
    """One simulated node: its name, size and, for GPU nodes, the GPUs it carries."""

    name: str
    cpu: str
    memory: str
    gpu: Gpu | None = None
    gpu_count: int = 0
    pods: int = 110


A100_80GB = Gpu(product="NVIDIA-A100-SXM4-80GB", memory_mib=81920, family="ampere")
H100_80GB = Gpu(product="NVIDIA-H100-80GB-HBM3", memory_mib=81559, family="hopper")


def default_nodes() -> tuple[NodeSpec, ...]:
    """Two 4-GPU A100 nodes, one 8-GPU H100 node and one CPU-only node."""
    return (
        NodeSpec("gpu-a100-0", cpu="64", memory="512Gi", gpu=A100_80GB, gpu_count=4),
        NodeSpec("gpu-a100-1", cpu="64", memory="512Gi", gpu=A100_80GB, gpu_count=4),
        NodeSpec("gpu-h100-0", cpu="96", memory="1024Gi", gpu=H100_80GB, gpu_count=8),
        NodeSpec("cpu-0", cpu="16", memory="64Gi"),
    )


def node_labels(spec: NodeSpec) -> dict[str, str]:
    """Well-known node labels, plus GPU feature discovery's labels on GPU nodes."""
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": "gpu" if spec.gpu else "cpu",
        "type": "kwok",
    }
    if spec.gpu is not None:
        labels |= {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": spec.gpu.product,
            "nvidia.com/gpu.count": str(spec.gpu_count),
            "nvidia.com/gpu.memory": str(spec.gpu.memory_mib),
            "nvidia.com/gpu.family": spec.gpu.family,
            "nvidia.com/gpu.machine": "kwok",
        }
    return labels


def node_manifest(spec: NodeSpec) -> dict[str, Any]:
    """The Node object for ``spec``, status included.

    The API server keeps a Node's status on create, and kwok's node stages keep the capacity
    they find, so this is what the scheduler sees.
    """
    resources = {"cpu": spec.cpu, "memory": spec.memory, "pods": str(spec.pods)}
    if spec.gpu is not None:
        resources[GPU_RESOURCE] = str(spec.gpu_count)
    node_spec: dict[str, Any] = {}
    if spec.gpu is not None:
        node_spec["taints"] = [dict(GPU_TAINT)]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": spec.name,
            "labels": node_labels(spec),
            "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": node_spec,
        "status": {
            "capacity": dict(resources),
            "allocatable": dict(resources),
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "fake",
                "kubeProxyVersion": "fake",
            },
        },
    }
