"""Crash at every write: a canary rollout carried out by a chain of operator processes, each
ended (as if SIGKILLed) just before its second write, on the real control plane.

Every write of the rollout is followed by a crash, so every point between two API calls of a
reconcile is one a process died at. The rollout must end exactly where an undisturbed one
does: version 2 promoted once, the canary Deployment gone, no other child, no step announced
twice.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localcluster import Cluster
from localcluster.operator import OperatorProcess, free_port
from modeldeploy_operator.k8s.faults import CRASH_EXIT_CODE, ENVIRONMENT
from rollout_support import NAME, md_status, start_canary
from support import DELETE, load_example, merged, wait_for

pytestmark = pytest.mark.cluster

QUIET_SECONDS = 15.0  # a process that writes nothing this long has nothing left to do
MAX_PROCESSES = 80


def crashing_operator(cluster: Cluster, namespace: str, log: Path) -> int | None:
    """One operator process (this namespace only, no Lease) armed to die before its second
    write: its exit code, or None when it wrote nothing more for QUIET_SECONDS."""
    command = [
        sys.executable,
        "-m",
        "modeldeploy_operator",
        f"--kubeconfig={cluster.state.kubeconfig}",
        f"--namespace={namespace}",
        "--no-leader-elect",
        "--bind-address=127.0.0.1",
        f"--metrics-port={free_port()}",
        f"--health-port={free_port()}",
        "--resync-seconds=1",
        "--log-format=json",
    ]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command, env={**os.environ, ENVIRONMENT: "1"}, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            return proc.wait(timeout=QUIET_SECONDS)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=20)
            return None


def test_a_rollout_killed_between_every_pair_of_writes_ends_as_an_undisturbed_one(
    cluster: Cluster, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    manifest = merged(
        load_example("minimal.yaml"),
        {
            "spec": {
                "replicas": 2,
                "resources": {"gpu": DELETE},
                "rollout": {
                    "strategy": "Canary",
                    "steps": [{"weight": 50, "pause": "2s"}, {"weight": 100}],
                },
            }
        },
    )
    start_canary(cluster, namespace, manifest)  # version 1 Available, version 2 applied
    operator.stop()
    try:
        codes = []
        for _ in range(MAX_PROCESSES):
            code = crashing_operator(cluster, namespace, tmp_path / "crashing.log")
            if code is None:
                break
            codes.append(code)

        else:
            pytest.fail(f"still writing after {MAX_PROCESSES} processes; see {tmp_path}")
    finally:
        operator.start()
    # Every process died at the fault point (anything else is a real crash), and the rollout
    # took several writes, each followed by a crash.
    assert set(codes) == {CRASH_EXIT_CODE}, codes
    assert len(codes) >= 5, codes

    def promoted() -> bool:
        status = md_status(cluster, namespace)
        return (status.get("stable") or {}).get("version") == "2" and not status.get("canary")

    wait_for("version 2 promoted", promoted, timeout=60)
    status = md_status(cluster, namespace)
    assert [h["result"] for h in status["history"]] == ["Promoted"]
    deployments = cluster.kubectl_json("get", "deployments", "-n", namespace)["items"]
    assert sorted(d["metadata"]["name"] for d in deployments) == [f"{NAME}-stable"]
    stable = deployments[0]
    assert stable["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == "2"
    services = cluster.kubectl_json("get", "services", "-n", namespace)["items"]
    assert sorted(s["metadata"]["name"] for s in services) == [NAME]
    # At most once each: an Event follows its status write, so a crash between them loses the
    # Event; none is ever announced twice.
    events = cluster.kubectl_json("get", "events", "-n", namespace)["items"]
    reasons = collections.Counter(
        e["reason"] for e in events if e["involvedObject"].get("kind") == "ModelDeployment"
    )
    assert reasons["StepAdvanced"] <= 1, reasons
    assert reasons["Promoted"] <= 1, reasons
    assert all(e.get("count", 1) == 1 for e in events if e["reason"] == "StepAdvanced")
