"""The activator's API client (runtime/modeldeploy_runtime/kube.py) against the real API
server: its conditional wake patch of the scale subresource, and its list and watch. (A fake
server cannot tell: autoscaling/v1 Scale omits a 0 replicas, and a patch that tested
``/spec/replicas`` was refused at every wake; the real-pod test found it.)"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import pytest

from localcluster import Cluster
from modeldeploy_runtime.kube import KubeApi
from support import load_example, merged

pytestmark = pytest.mark.cluster


@pytest.fixture
def api(cluster: Cluster) -> Iterator[KubeApi]:
    """The client over ``kubectl proxy`` (plain HTTP on 127.0.0.1, the admin's rights)."""
    proxy = subprocess.Popen(
        [
            str(cluster.toolchain.path("kubectl")),
            "--kubeconfig",
            str(cluster.state.kubeconfig),
            "proxy",
            "--port=0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None
        found = re.search(r"127\.0\.0\.1:(\d+)", proxy.stdout.readline())
        assert found is not None
        yield KubeApi(f"http://127.0.0.1:{found.group(1)}", token_file=None)
    finally:
        proxy.terminate()
        proxy.wait(10)


def sleeping(name: str, replicas: int) -> str:
    manifest = merged(
        load_example("iris-scale-to-zero.yaml"),
        {"metadata": {"name": name}, "spec": {"replicas": replicas}},
    )
    return json.dumps(manifest)


def replicas(cluster: Cluster, namespace: str, name: str) -> int:
    found = cluster.kubectl_json("get", "md", name, "-n", namespace)
    return int(found["spec"]["replicas"])


def test_the_wake_patch_raises_a_scale_at_zero_once_and_leaves_any_other_alone(
    cluster: Cluster, crd: None, namespace: str, api: KubeApi
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=sleeping("asleep", 0))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=sleeping("awake", 2))
    assert api.patch_scale(namespace, "asleep", 1) is True
    assert replicas(cluster, namespace, "asleep") == 1
    # A second wake (the other activator replica's) finds it raised: nothing changes.
    assert api.patch_scale(namespace, "asleep", 1) is False
    assert api.patch_scale(namespace, "awake", 1) is False
    assert replicas(cluster, namespace, "awake") == 2
    items, version = api.list(namespace)
    assert {i["metadata"]["name"] for i in items} == {"asleep", "awake"}
    assert version
