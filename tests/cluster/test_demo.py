"""`make demo`, the README's first command, on a private throw-away cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from localcluster import Cluster
from localcluster.cluster import processes_mentioning

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]


def make(target: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT),
            target,
            f"CLUSTER_DIR={state_dir}",
            "CLUSTER_NAME=demo",
            f"PYTHON={sys.executable}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_make_demo_shows_the_example_ready_and_cluster_down_stops_everything(
    cluster: Cluster, tmp_path: Path
) -> None:
    state_dir = tmp_path / "demo"
    try:
        demo = make("demo", state_dir)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "modeldeployment.serving.modeldeploy.io/resnet50 condition met" in demo.stdout
        table = demo.stdout.split("$ kubectl get md -o wide", 1)[1].splitlines()
        assert table[2].split()[:5] == ["resnet50", "resnet50", "1", "1/1", "Available"]
        assert "Normal   Ready" in demo.stdout
        assert (state_dir / "operator.pid").is_file()
    finally:
        down = make("cluster-down", state_dir)
    assert down.returncode == 0, down.stderr
    assert "operator=" in down.stderr
    assert processes_mentioning(str(state_dir)) == []
