"""Crash at every write: a canary rollout, and a rollback, each carried out by a chain of
operator processes, each ended (as if SIGKILLed) just before its second write, on the real
control plane.

Every write is followed by a crash, so every point between two API calls of a reconcile is
one a process died at. Each must end exactly where an undisturbed one does: version 2
promoted once (or rolled back once, version 1 serving), the canary Deployment gone, no other
child, no step or outcome announced twice.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from localcluster import Cluster
from localcluster.operator import OperatorProcess, free_port
from modeldeploy_operator.k8s.faults import CRASH_EXIT_CODE, ENVIRONMENT
from rollout_support import NAME, manual_canary, md_status, start_canary
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


def crash_chain(
    cluster: Cluster, operator: OperatorProcess, namespace: str, log: Path
) -> list[int]:
    """With the session's operator stopped, crashing operators one after another until one
    has nothing left to write; their exit codes. Each must have died at the fault point
    (anything else is a real crash), and the work must have taken several writes."""
    operator.stop()
    codes = []
    try:
        for _ in range(MAX_PROCESSES):
            code = crashing_operator(cluster, namespace, log)
            if code is None:
                break
            codes.append(code)
        else:
            pytest.fail(f"still writing after {MAX_PROCESSES} processes; see {log}")
    finally:
        operator.start()
    assert set(codes) == {CRASH_EXIT_CODE}, codes
    return codes


def announced(cluster: Cluster, namespace: str) -> collections.Counter[str]:
    """The Events about the ModelDeployment, by reason (each counted with its repeats)."""
    events = cluster.kubectl_json("get", "events", "-n", namespace)["items"]
    return collections.Counter(
        {
            reason: sum(
                e.get("count", 1)
                for e in events
                if e["reason"] == reason and e["involvedObject"].get("kind") == "ModelDeployment"
            )
            for reason in {e["reason"] for e in events}
        }
    )


def children(cluster: Cluster, namespace: str, kind: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.kubectl_json("get", kind, "-n", namespace)["items"]
    return items


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
    codes = crash_chain(cluster, operator, namespace, tmp_path / "crashing.log")
    assert len(codes) >= 5, codes

    def promoted() -> bool:
        status = md_status(cluster, namespace)
        return (status.get("stable") or {}).get("version") == "2" and not status.get("canary")

    wait_for("version 2 promoted", promoted, timeout=60)
    status = md_status(cluster, namespace)
    assert [h["result"] for h in status["history"]] == ["Promoted"]
    deployments = children(cluster, namespace, "deployments")
    assert sorted(d["metadata"]["name"] for d in deployments) == [f"{NAME}-stable"]
    stable = deployments[0]
    assert stable["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == "2"
    services = children(cluster, namespace, "services")
    assert sorted(s["metadata"]["name"] for s in services) == [NAME]
    # At most once each: an Event follows its status write, so a crash between them loses the
    # Event; none is ever announced twice.
    reasons = announced(cluster, namespace)
    assert reasons["StepAdvanced"] <= 1, reasons
    assert reasons["Promoted"] <= 1, reasons


def test_a_rollback_killed_between_every_pair_of_writes_ends_as_an_undisturbed_one(
    cluster: Cluster, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    """An SRE's rollback (the same decision a failed analysis makes) of a canary waiting at
    50 %: the chain must end with version 1 serving on all replicas, the revision held, one
    RolledBack in the history, the canary gone."""
    start_canary(cluster, namespace, manual_canary())
    wait_for(
        "the canary at 50 %",
        lambda: (
            (md_status(cluster, namespace).get("canary") or {}).get("weight") == 50
            and len(children(cluster, namespace, "deployments")) == 2
        ),
        timeout=60,
    )
    operator.stop()  # the command is for the chain to carry out
    cluster.kubectl(
        "annotate", "md", NAME, "-n", namespace, "serving.modeldeploy.io/command=rollback"
    )
    codes = crash_chain(cluster, operator, namespace, tmp_path / "crashing.log")
    assert len(codes) >= 3, codes

    def rolled_back() -> bool:
        status = md_status(cluster, namespace)
        return bool(status.get("rollback")) and not status.get("canary")

    wait_for("the rollback done", rolled_back, timeout=60)
    status = md_status(cluster, namespace)
    assert status["stable"]["version"] == "1"
    assert status["rollback"]["reason"] == "RolledBack"
    assert [h["result"] for h in status["history"]] == ["RolledBack"]
    deployments = children(cluster, namespace, "deployments")
    assert sorted(d["metadata"]["name"] for d in deployments) == [f"{NAME}-stable"]
    stable = deployments[0]
    assert stable["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == "1"
    assert stable["spec"]["replicas"] == 2
    assert announced(cluster, namespace)["RolledBack"] <= 1
