"""Fixtures shared by every test tier.

The ``cluster`` fixture gives the session one real local control plane: it reuses the cluster
``make cluster-up`` started, or starts one for this run and stops it at the end.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster import Cluster, ClusterState, Toolchain
from localcluster.dataplane import OPERATOR_NAMESPACE, RELEASE, uninstall_operator
from localcluster.operator import OperatorProcess
from localcluster.realnode import RealNodeSpec

CRDS = Path(__file__).resolve().parents[1] / "crds"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """``CLUSTER_NAME`` and ``REAL_NODE=0`` (as for ``make cluster-up``) pick a second,
    simulated-only cluster, so two test runs can share a machine."""
    state = ClusterState.default()
    state = ClusterState(state.root, os.environ.get("CLUSTER_NAME") or state.name)
    real_node = None if os.environ.get("REAL_NODE") == "0" else RealNodeSpec()
    local = Cluster(Toolchain.locate(), state, real_node=real_node)
    started_here = local.up()
    yield local
    if started_here:
        local.down()


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> None:
    """The ModelDeployment CRD from crds/, installed and established."""
    for path in sorted(CRDS.glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cluster.wait_established(30)


@pytest.fixture(scope="session")
def gateway_api(cluster: Cluster) -> None:
    """The Gateway API CRDs (standard channel), from the published Go module."""
    for path in cluster.toolchain.gateway_api_crds():
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cluster.wait_established(60)


@pytest.fixture(scope="session")
def keda_crds(cluster: Cluster) -> None:
    """KEDA's CRDs (no KEDA controller: the API server validates ScaledObjects)."""
    for path in cluster.toolchain.keda_crds():
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cluster.wait_established(60)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower().replace("_", "-"))[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator as a real process, watching every namespace; its log is in the tmp dir.
    Short Lease timings: tests that SIGKILL it wait for its Lease to run out (5 s, not 15 s);
    the high-availability tests run the defaults. A chart operator left running on a reused
    cluster (``make demo`` leaves one) is uninstalled first: it would reconcile every test's
    namespace beside this one."""
    if (
        cluster.kubectl(
            "get", "deployment", "-n", OPERATOR_NAMESPACE, RELEASE, check=False
        ).returncode
        == 0
    ):
        uninstall_operator(cluster)
    process = OperatorProcess(
        cluster,
        tmp_path_factory.mktemp("operator") / "operator.log",
        extra_args=(
            "--leader-election-lease-duration=5",
            "--leader-election-renew-deadline=4",
            "--leader-election-retry-period=1",
        ),
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture
def own_operator(operator: OperatorProcess) -> Iterator[list[OperatorProcess]]:
    """Room for the test's own operators: the session's one (which watches every namespace)
    is stopped meanwhile; the test's are stopped at the end."""
    operator.stop()
    started: list[OperatorProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop()
        operator.start()
