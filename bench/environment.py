"""Shared by the benchmarks that need the cluster and Triton: the local cluster with our CRD
(started here unless `make cluster-up` already runs one) and a real Triton server."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from localcluster import Cluster, ClusterState, Toolchain  # noqa: E402
from localcluster.operator import free_port  # noqa: E402
from triton_support import Endpoint, start_triton, stop  # noqa: E402


@dataclass(frozen=True)
class Environment:
    cluster: Cluster
    triton: Endpoint
    work: Path  # logs and Prometheus data of this run


@contextmanager
def cluster_and_triton(prefix: str) -> Iterator[Environment]:
    work = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = Cluster(Toolchain.locate(), ClusterState.default())
    started_here = cluster.up()
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        cluster.wait_established(30)
        triton_proc, triton = start_triton(
            work / "triton.log", (free_port(), free_port(), free_port())
        )
        try:
            yield Environment(cluster, triton, work)
        finally:
            stop(triton_proc, group=True)
    finally:
        if started_here:
            cluster.down()
