"""The work queue on the real control plane: an object stuck in its canary analysis (its
Prometheus accepts connections and never answers) holds one worker, not the others."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import Cluster
from localcluster.operator import OperatorProcess, metric_sum
from modeldeploy_operator.api.v1alpha1 import API_VERSION, KIND
from modeldeploy_operator.k8s.client import KubernetesApi, load_api_client
from rollout_support import manual_canary, start_canary
from support import DELETE, load_example, local_server, merged, wait_for

pytestmark = pytest.mark.cluster

PROMETHEUS_TIMEOUT = 5.0  # the operator's default --prometheus-timeout
QUERIES = 3  # so one analysis pass against the blackhole takes about 15 s
OTHER = "vit"  # listed after resnet50 (the stuck one): a serial resync would reach it last


@contextmanager
def blackhole() -> Iterator[tuple[str, threading.Event]]:
    """An HTTP "Prometheus" on 127.0.0.1 that accepts connections and never answers; the
    event is set at the first connection."""
    accepted = threading.Event()
    held: list[socket.socket] = []

    def hold(conn: socket.socket) -> None:  # never read, never answered
        held.append(conn)
        accepted.set()

    try:
        with local_server(hold) as url:
            yield url, accepted
    finally:
        for conn in held:
            conn.close()


@pytest.fixture
def small_operator(
    cluster: Cluster, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """Two workers and a 2 s budget, on the test's namespace; the session's operator stopped
    (it would hold the Lease and reconcile this namespace too)."""
    operator.stop()
    process = OperatorProcess(
        cluster,
        tmp_path / "operator.log",
        extra_args=(
            f"--namespace={namespace}",
            f"--leader-election-namespace={namespace}",
            "--workers=2",
            "--reconcile-budget-seconds=2",
        ),
    )
    try:
        process.start()
        yield process
    finally:
        process.stop()
        operator.start()


# A reference profile in a ConfigMap that does not exist yet.
PROFILE = {"enabled": True, "referenceProfile": {"configMapRef": {"name": "profile"}}}


def apply(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))


def test_an_object_stuck_in_its_analysis_does_not_delay_another(
    cluster: Cluster, small_operator: OperatorProcess, namespace: str
) -> None:
    api = KubernetesApi(load_api_client(str(cluster.state.kubeconfig)))

    def status(name: str) -> dict[str, Any]:
        found = api.get(API_VERSION, KIND, namespace, name)
        return dict((found or {}).get("status") or {})

    with blackhole() as (url, stalled):
        other = merged(
            load_example("minimal.yaml"),
            {
                "metadata": {"name": OTHER},
                "spec": {"resources": {"gpu": DELETE}, "monitoring": {"runtime": PROFILE}},
            },
        )
        apply(cluster, namespace, other)  # Degraded (ConfigMapNotFound) until it comes
        analysis = {
            "interval": "1s",
            "failureLimit": 100,
            "prometheus": {"url": url},
            "metrics": [{"name": f"q{i}", "query": "vector(0)", "max": 1} for i in range(QUERIES)],
        }
        stuck = manual_canary(analysis=analysis)
        start_canary(cluster, namespace, stuck)  # resnet50: version 1 Available, then 2
        wait_for(
            f"{OTHER} Degraded, its pod Ready",
            lambda: (
                status(OTHER).get("phase") == "Degraded" and status(OTHER).get("readyReplicas") == 1
            ),
        )
        wait_for("resnet50's analysis to query the blackhole", stalled.is_set, timeout=60)
        stalled_at = time.monotonic()

        # Nothing watches ConfigMaps: only the resync sees this one come (vit is settled: no
        # events), and it does not wait for resnet50.
        created = time.monotonic()
        cluster.kubectl(
            "create", "configmap", "profile", "-n", namespace, "--from-literal=profile.json={}"
        )
        while status(OTHER).get("phase") == "Degraded":
            assert time.monotonic() < created + 30, "the resync never saw the ConfigMap"
            time.sleep(0.01)
        seen = time.monotonic() - created
        print(f"vit's ConfigMap seen {seen:.3f} s after it was created (resync every 3 s)")
        assert seen < small_operator.resync_seconds + 1.0

        generation = (api.get(API_VERSION, KIND, namespace, OTHER) or {})["metadata"]["generation"]
        changed = time.monotonic()
        api.merge_patch(
            API_VERSION, KIND, namespace, OTHER, {"spec": {"replicas": 2}}, field_manager="test"
        )
        deadline = changed + 30
        while status(OTHER).get("observedGeneration", 0) <= generation:
            assert time.monotonic() < deadline, "vit's status was never written"
            time.sleep(0.01)
        took = time.monotonic() - changed
        print(f"vit's status written {took:.3f} s after its change, resnet50 stuck")
        assert took < 1.0
        still_stuck = time.monotonic() - stalled_at < QUERIES * PROMETHEUS_TIMEOUT
        assert still_stuck, "the measurements must fall inside resnet50's first analysis"

        wait_for(
            "resnet50's pass to be counted over its budget",
            lambda: (
                metric_sum(
                    small_operator.metrics(), "modeldeploy_operator_reconcile_over_budget_total"
                )
                >= 1
            ),
            timeout=QUERIES * PROMETHEUS_TIMEOUT * 2 + 10,
        )
    log = small_operator.log_path.read_text()
    assert f"Reconcile of ModelDeployment {namespace}/resnet50 took" in log
    assert f"{namespace}/{OTHER} took" not in log
