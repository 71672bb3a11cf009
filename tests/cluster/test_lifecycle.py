"""`make cluster-up` / `make cluster-down` on a second, throw-away cluster: starting twice and
stopping twice give clear messages, and nothing we started outlives `down`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from localcluster import Cluster, ClusterState, Toolchain
from localcluster.cluster import process_cmdline, processes_mentioning

pytestmark = pytest.mark.cluster

TESTS_DIR = Path(__file__).resolve().parents[1]


def localcluster(state_dir: Path, command: str) -> subprocess.CompletedProcess[str]:
    """Run the command `make cluster-*` runs, against a private state folder."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "localcluster",
            command,
            "--state-dir",
            str(state_dir),
            "--name",
            "lifecycle",
        ],
        env={**os.environ, "PYTHONPATH": str(TESTS_DIR)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_up_twice_then_down_twice_leaves_nothing_running(cluster: Cluster, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    private = Cluster(Toolchain.locate(), ClusterState(state_dir, "lifecycle"))

    first = localcluster(state_dir, "up")
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

    second = localcluster(state_dir, "up")
    assert second.returncode == 0, second.stderr
    assert "already running" in second.stderr
    assert "Traceback" not in second.stderr
    assert private.processes() == started

    down = localcluster(state_dir, "down")
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stderr
    assert [p for p in started if process_cmdline(p.pid) is not None] == []
    assert processes_mentioning(str(state_dir)) == []
    assert not state_dir.exists()

    again = localcluster(state_dir, "down")
    assert again.returncode == 0
    assert "nothing to stop" in again.stderr
    assert "Traceback" not in again.stderr

    status = localcluster(state_dir, "status")
    assert status.returncode == 1
    assert "not running" in status.stdout

    # The session's own cluster was never touched.
    assert cluster.is_running()
