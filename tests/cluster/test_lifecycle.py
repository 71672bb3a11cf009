"""`make cluster-up` / `make cluster-down` on a second, throw-away cluster: starting twice and
stopping twice give clear messages, and nothing we started outlives `down`."""

from __future__ import annotations

from pathlib import Path

import pytest

from localcluster import Cluster, ClusterState, Toolchain
from localcluster.processes import process_cmdline, processes_mentioning
from support import make

pytestmark = pytest.mark.cluster


def test_up_twice_then_down_twice_leaves_nothing_running(cluster: Cluster, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    private = Cluster(Toolchain.locate(), ClusterState(state_dir, "lifecycle"))

    first = make("cluster-up", state_dir, "lifecycle")
    assert first.returncode == 0, first.stderr
    assert f"export KUBECONFIG={state_dir / 'kubeconfig'}" in first.stdout
    assert private.is_running()
    started = private.processes()
    assert {p.component for p in started} >= {
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok-controller",
    }

    second = make("cluster-up", state_dir, "lifecycle")
    assert second.returncode == 0, second.stderr
    assert "already running" in second.stderr
    assert "Traceback" not in second.stderr
    assert private.processes() == started

    down = make("cluster-down", state_dir, "lifecycle")
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stderr
    assert [p for p in started if process_cmdline(p.pid) is not None] == []
    assert processes_mentioning(str(state_dir)) == []
    assert not state_dir.exists()

    again = make("cluster-down", state_dir, "lifecycle")
    assert again.returncode == 0
    assert "nothing to stop" in again.stderr
    assert "Traceback" not in again.stderr

    status = make("cluster-status", state_dir, "lifecycle")
    assert status.returncode != 0
    assert "not running" in status.stdout

    # The session's own cluster was never touched.
    assert cluster.is_running()
