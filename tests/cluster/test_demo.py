"""`make demo`, the README's first command, on a private throw-away cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from localcluster import Cluster
from localcluster.cluster import processes_mentioning
from support import make

pytestmark = pytest.mark.cluster


def test_make_demo_shows_the_example_ready_and_cluster_down_stops_everything(
    cluster: Cluster, tmp_path: Path
) -> None:
    state_dir = tmp_path / "demo"
    try:
        demo = make("demo", state_dir, "demo")
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "modeldeployment.serving.modeldeploy.io/resnet50 condition met" in demo.stdout
        table = demo.stdout.split("$ kubectl get md -o wide", 1)[1].splitlines()
        assert table[2].split()[:5] == ["resnet50", "resnet50", "1", "1/1", "Available"]
        assert "Normal   Ready" in demo.stdout
        assert (state_dir / "operator.pid").is_file()
    finally:
        down = make("cluster-down", state_dir, "demo")
    assert down.returncode == 0, down.stderr
    assert "operator=" in down.stderr
    assert processes_mentioning(str(state_dir)) == []
