"""A real local Kubernetes control plane with simulated GPU nodes, for tests and demos.

kwokctl (``--runtime binary``) runs etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and the kwok controller as plain processes on 127.0.0.1. Every binary is built
from the pinned Go module in ``tools/toolchain`` and cached outside the repository
(:mod:`localcluster.toolchain`); the fake nodes are described in :mod:`localcluster.nodes`;
:mod:`localcluster.cluster` starts, checks and stops the whole thing.

Command line: ``python -m localcluster {build,up,down,status}`` (``make cluster-up`` etc.).
"""

from localcluster.cluster import Cluster, ClusterError, ClusterState
from localcluster.toolchain import Toolchain, ToolchainError

__all__ = ["Cluster", "ClusterError", "ClusterState", "Toolchain", "ToolchainError"]
