"""Model archives on the real node: `modeldeploy-runtime package` pushes the iris model to a
real OCI registry (go-containerregistry's, on the node's address); real pods fetch it through
the fetcher, verify it, keep it in the node cache, and a real Triton serves it with the
archive's own config; the sidecar measures drift against the archive's profile; status,
history and `kubectl modeldeploy history` show the digest served."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from localcluster import Cluster
from localcluster.dataplane import (
    install_operator,
    service_address,
    uninstall_operator,
)
from localcluster.operator import OperatorProcess
from localcluster.realnode import RealNodeSpec
from modeldeploy_runtime.model_repository import render_config
from realnode_support import (
    answering,
    in_sidecar,
    last_history,
    md_status,
    plugin,
    pods,
    promoted,
    ready,
    sidecar_metrics,
)
from stores_support import start_registry
from support import EXAMPLES, load_example, merged, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.realnode]

RUNTIME_UID = 1000  # the runtime image's user, who writes the node cache


@pytest.fixture(scope="module")
def node_registry(
    cluster: Cluster, real_node: RealNodeSpec, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real OCI registry on the node's address: the host pushes to it, pods pull from it."""
    proc, registry = start_registry(tmp_path_factory.mktemp("node-registry"), real_node.node_ip)
    try:
        yield registry.host
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cache_operator(
    cluster: Cluster, crd: None, operator: OperatorProcess, prometheus_url: str
) -> Iterator[Path]:
    """The chart's operator with the node cache on (a folder of this machine, which is the
    node); the session's operator runs again after it. Yields the cache folder."""
    cache = cluster.state.root / "model-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(mode=0o700)
    os.chown(cache, RUNTIME_UID, RUNTIME_UID)
    operator.stop()
    try:
        install_operator(
            cluster, prometheus_url=prometheus_url, resync_seconds=10, model_cache_dir=cache
        )
        yield cache
    finally:
        uninstall_operator(cluster)
        operator.start()


def package(workdir: Path, host: str, version: str) -> str:
    """iris ``version`` packaged with a config of its own and a drift profile, pushed as
    ``iris:<version>``; the digest the registry holds."""
    source = workdir / f"src-{version}"
    shutil.copytree(EXAMPLES / "models" / "iris" / version, source / version)
    config = render_config("iris", "python", version, {})
    (source / "config.pbtxt").write_text(
        config + f'parameters: {{ key: "archive" value: {{ string_value: "iris-v{version}" }} }}\n'
    )
    rows = workdir / "rows.npy"
    generator = np.random.default_rng(7)
    np.save(rows, generator.normal([5.8, 3.0, 4.3, 1.3], 0.5, size=(500, 4)).astype(np.float32))
    profile = workdir / "profile.json"
    runtime = [sys.executable, "-m", "modeldeploy_runtime"]
    subprocess.run(
        [*runtime, "profile", f"--inputs={rows}", "--input-tensor=features", f"--out={profile}"],
        check=True,
    )
    done = subprocess.run(
        [
            *runtime,
            "package",
            str(source),
            "--name=iris",
            f"--version={version}",
            "--format=python",
            "--training=dataset=iris.csv",
            f"--reference-profile={profile}",
            f"--output={workdir / f'archive-{version}'}",
            f"--push=oci://{host}/models/iris:{version}",
            "--plain-http",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("pushed "))
    return line.rsplit(" ", 1)[1]


def live_pods(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    """Running pods that are not going away (a deleted pod lingers, Succeeded, a while)."""
    return [
        p
        for p in pods(cluster, namespace)
        if not p["metadata"].get("deletionTimestamp") and p["status"].get("phase") == "Running"
    ]


def fetch_reports(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    """What each live pod's fetcher reported (its termination message), by pod."""
    found = {}
    for pod in live_pods(cluster, namespace):
        for status in pod["status"].get("initContainerStatuses", []):
            message = status["state"].get("terminated", {}).get("message")
            if message:
                found[pod["metadata"]["name"]] = json.loads(message)
    return found


def archived(host: str, version: str, replicas: int) -> str:
    """examples/iris-archive.yaml at ``version``, from the registry at ``host``."""
    uri = f"oci://{host}/models/iris:{version}"
    patch = {
        "spec": {
            "model": {"version": version, "storageUri": uri},
            "replicas": replicas,
            # Every request is sampled for drift: at the default 0.1, the test's 20 requests
            # left no sample at all one run in eight (0.9**20).
            "monitoring": {"runtime": {"sampleRate": 1.0}},
        }
    }
    return json.dumps(merged(load_example("iris-archive.yaml"), patch))


def test_an_archive_is_served_verified_cached_and_recorded(
    cluster: Cluster,
    cache_operator: Path,
    node_registry: str,
    namespace: str,
    real_node: RealNodeSpec,
    tmp_path: Path,
) -> None:
    first = package(tmp_path, node_registry, "1")
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=archived(node_registry, "1", 2))
    wait_for("iris Ready from its archive", lambda: ready(cluster, namespace), timeout=300)
    address = service_address(cluster, namespace, "iris")
    wait_for("iris answering", lambda: answering(address, "1"), timeout=60)

    # Status says what the pods serve: the tag resolved to the pushed digest.
    wait_for(
        "the digest in status",
        lambda: (md_status(cluster, namespace).get("stable") or {}).get("digest") == first,
        timeout=60,
    )
    # Two replicas fetched at once on one node: each blob came down once (a lock per digest;
    # the other pod waited and linked it), whichever pod got to it first.
    archive = (tmp_path / "archive-1").rglob("*")
    archive_bytes = sum(f.stat().st_size for f in archive if f.is_file())
    reports = fetch_reports(cluster, namespace)
    assert sum(r["downloaded_bytes"] for r in reports.values()) == archive_bytes
    assert any(cache_operator.joinpath("blobs", "sha256").iterdir())
    # The pod that downloaded most is replaced: its successor starts warm (nothing downloaded,
    # all from the node's cache), and then both replicas count as warm.
    cold = max(reports, key=lambda name: reports[name]["downloaded_bytes"])
    assert not reports[cold]["warm"]
    cluster.kubectl("delete", "pod", "-n", namespace, cold, "--wait=false")

    def both_warm() -> bool:
        return md_status(cluster, namespace).get("warmReplicas") == 2 and ready(cluster, namespace)

    wait_for("both replicas started from the node cache", both_warm, timeout=120)
    assert all(r["downloaded_bytes"] == 0 for r in fetch_reports(cluster, namespace).values())
    # The node now says its cache holds the archive: pods pinned to it prefer this node.
    label = "cache.modeldeploy.io/sha256." + first.removeprefix("sha256:")[:48]
    wait_for(
        "the node's cache label",
        lambda: label in cluster.kubectl_json("get", "node", real_node.name)["metadata"]["labels"],
        timeout=60,
    )

    pod = live_pods(cluster, namespace)[0]["metadata"]["name"]
    # Triton serves the archive's own config (asked inside the pod, past the sidecar's door).
    config = json.loads(
        in_sidecar(
            cluster,
            namespace,
            pod,
            "import urllib.request;print(urllib.request.urlopen("
            "'http://127.0.0.1:8000/v2/models/iris/config').read().decode())",
        )
    )
    assert config["parameters"]["archive"]["string_value"] == "iris-v1"
    # The sidecar measures drift against the profile the archive carries (no ConfigMap).
    for _ in range(20):
        answering(address)

    def drift_sampled() -> bool:
        return any(
            line.startswith("modeldeploy_runtime_drift_samples_total") and float(line.split()[-1])
            for p in live_pods(cluster, namespace)
            for line in sidecar_metrics(cluster, namespace, p["metadata"]["name"]).splitlines()
        )

    wait_for("drift samples against the archive's profile", drift_sampled, timeout=60)

    # Version 2 as a canary, promoted: history records the digest it served.
    second = package(tmp_path, node_registry, "2")
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=archived(node_registry, "2", 2))
    wait_for(
        "the canary's digest",
        lambda: (md_status(cluster, namespace).get("canary") or {}).get("digest") == second,
        timeout=300,
    )
    plugin(cluster, "promote", "iris", "-n", namespace)
    wait_for("version 2 promoted", lambda: promoted(cluster, namespace, "2"), timeout=300)
    assert last_history(cluster, namespace)["digest"] == second
    assert md_status(cluster, namespace)["stable"]["digest"] == second
    assert second[:19] in plugin(cluster, "history", "iris", "-n", namespace)
    wait_for("version 2 answering", lambda: answering(address, "2"), timeout=120)
