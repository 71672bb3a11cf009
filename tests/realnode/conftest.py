"""The real-pod tier: the session cluster's real node runs our images.

The operator runs as users run it, installed by the Helm chart as a pod on the real node; the
session's host-process operator is stopped meanwhile (two operators would race). Prometheus
discovers the model pods through the API server. Each test serves its models from a store on
this machine (examples/models plus this folder's broken releases) through a `model-store`
claim in its own namespace.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster import Cluster
from localcluster.dataplane import (
    ClusterPrometheus,
    install_operator,
    serve_model_store,
    uninstall_operator,
)
from localcluster.operator import OperatorProcess
from localcluster.realnode import RealNodeSpec
from support import EXAMPLES

MODELS = Path(__file__).parent / "models"


@pytest.fixture(scope="session")
def real_node(cluster: Cluster) -> RealNodeSpec:
    node = cluster.node
    if cluster.real_node_spec is None or node is None or not node.daemons():
        pytest.fail("the session cluster has no real node: `make cluster-down cluster-up`")
    return cluster.real_node_spec


@pytest.fixture(scope="session")
def prometheus_url(cluster: Cluster, real_node: RealNodeSpec) -> str:
    return ClusterPrometheus(cluster).ensure_started()


@pytest.fixture(scope="module")
def chart_operator(
    cluster: Cluster, crd: None, operator: OperatorProcess, prometheus_url: str
) -> Iterator[None]:
    """The chart's operator pod on the real node, for one module's tests; the session's
    operator runs again after it. (Module scope: without an __init__.py this folder is no
    package, and a "package" fixture would live until the session ends, leaving the pod, which
    cannot reach 127.0.0.1, in charge of the later tiers' ModelDeployments.)"""
    operator.stop()
    try:
        install_operator(cluster, prometheus_url=prometheus_url, resync_seconds=10)
        yield
    finally:
        uninstall_operator(cluster)
        operator.start()


@pytest.fixture
def store(cluster: Cluster, namespace: str, real_node: RealNodeSpec) -> Iterator[Path]:
    path = serve_model_store(cluster, namespace, [EXAMPLES / "models", MODELS])
    yield path
    cluster.kubectl("delete", "pv", f"model-store-{namespace}", "--wait=false", check=False)
