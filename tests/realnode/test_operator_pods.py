"""The chart's operator as Kubernetes runs it: two replicas on the real node, one leading on
the Lease. The leader's pod is killed the ways pods die (SIGKILL, the kernel's OOM killer, a
force-delete) and the Deployment is rolled (``kubectl rollout restart``): a standby takes over
within the Lease, a change made meanwhile is carried out, and the API server's audit log
(every write, each replica's identity in its User-Agent) never shows two replicas writing in
turns. Cases #31 and #32 of docs/reliability.md.

The ModelDeployments here run on the simulated nodes: what is tested is the operator's pods.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from localcluster import Cluster
from localcluster.dataplane import (
    OPERATOR_NAMESPACE,
    OPERATOR_PODS,
    install_operator,
    uninstall_operator,
)
from localcluster.operator import OperatorProcess
from support import cpu_model, get, wait_for, writes_by_operators

pytestmark = [pytest.mark.cluster, pytest.mark.realnode]

LEASE = "modeldeploy-operator"
LEASE_SECONDS = 15  # the chart's leaderElection.leaseDurationSeconds
RETRY_SECONDS = 2  # and its retryPeriodSeconds
# The case's bar is 60 s; ours is the Lease, a retry and a start's slack on a loaded machine.
TAKEOVER_BOUND = LEASE_SECONDS + RETRY_SECONDS + 13


@pytest.fixture(scope="module")
def two_replicas(cluster: Cluster, crd: None, operator: OperatorProcess) -> Iterator[None]:
    """The chart's operator, two replicas on the real node; the session's operator runs again
    after the module."""
    operator.stop()
    try:
        install_operator(cluster, prometheus_url=None, replicas=2, resync_seconds=10)
        yield
    finally:
        uninstall_operator(cluster)
        operator.start()


def operator_pods(cluster: Cluster) -> list[dict[str, Any]]:
    listed = cluster.kubectl_json("get", "pods", "-n", OPERATOR_NAMESPACE, "-l", OPERATOR_PODS)
    return [p for p in listed["items"] if not p["metadata"].get("deletionTimestamp")]


def ready_pods(cluster: Cluster) -> list[dict[str, Any]]:
    return [
        p
        for p in operator_pods(cluster)
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p["status"].get("conditions", [])
        )
    ]


def holder(cluster: Cluster) -> str | None:
    lease = get(cluster, OPERATOR_NAMESPACE, "lease", LEASE)
    return None if lease is None else lease["spec"].get("holderIdentity") or None


def settled_leader(cluster: Cluster) -> tuple[dict[str, Any], str]:
    """Both replicas Ready and one of them holding the Lease: (its pod, its identity)."""

    def found() -> tuple[dict[str, Any], str] | None:
        pods = ready_pods(cluster)
        identity = holder(cluster)
        if len(pods) != 2 or identity is None:
            return None
        leading = [p for p in pods if identity.startswith(f"{p['metadata']['name']}_")]
        return (leading[0], identity) if leading else None

    return wait_for("two operator replicas Ready, one leading", found, timeout=180)


def deployment_replicas(cluster: Cluster, namespace: str, name: str) -> int | None:
    found = get(cluster, namespace, "deployment", f"{name}-stable")
    return None if found is None else int(found["spec"]["replicas"])


def scale(cluster: Cluster, namespace: str, name: str, count: int) -> None:
    patch = json.dumps({"spec": {"replicas": count}})
    cluster.kubectl("patch", "md", name, "-n", namespace, "--type=merge", "-p", patch)


def writers_in_turn(cluster: Cluster, since: datetime.datetime) -> list[str]:
    """The identities whose writes landed since ``since``, in the order of their writes,
    each run of writes by one identity once. Two writers at the same time would appear in
    turns (A, B, A): the tests assert no identity appears twice.

    A refused write changed nothing and is left out: when a leader dies, the standby and the
    killed pod's restarted container may both try to take the Lease once it runs out, and
    the API server lets one update through (the other's resourceVersion is stale: 409); an
    Event for an object in a namespace being deleted is refused (403)."""
    runs: list[str] = []
    for _, identity, what in writes_by_operators(cluster, since):
        if not what.rsplit(" ", 1)[-1].startswith("2"):
            continue
        if not runs or runs[-1] != identity:
            runs.append(identity)
    return runs


def last_end(cluster: Cluster, pod: dict[str, Any]) -> dict[str, Any] | None:
    """How the pod's operator container last ended (``lastState.terminated``), if it did."""
    found = get(cluster, OPERATOR_NAMESPACE, "pod", pod["metadata"]["name"]) or {}
    for container in found.get("status", {}).get("containerStatuses", []):
        if container["name"] == "operator":
            ended: dict[str, Any] | None = container.get("lastState", {}).get("terminated")
            return ended
    return None


def kill(cluster: Cluster, pod: dict[str, Any], how: str) -> None:
    node = cluster.node
    assert node is not None
    (container,) = [c for c in pod["status"]["containerStatuses"] if c["name"] == "operator"]
    if how == "SIGKILL":
        os.kill(node.container_pid(container["containerID"]), signal.SIGKILL)
    elif how == "OOMKill":
        node.oom_kill(container["containerID"])
    else:  # force-delete: the API object goes at once; the kubelet stops the container
        name = pod["metadata"]["name"]
        cluster.kubectl(
            "delete", "pod", name, "-n", OPERATOR_NAMESPACE, "--grace-period=0", "--force"
        )


@pytest.mark.parametrize("how", ["SIGKILL", "OOMKill", "force-delete"])
def test_a_killed_leader_is_replaced_within_the_lease_and_never_writes_beside_it(
    cluster: Cluster, two_replicas: None, namespace: str, how: str
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(cpu_model("probe")))
    wait_for("probe's Deployment", lambda: deployment_replicas(cluster, namespace, "probe") == 1)
    pod, old = settled_leader(cluster)
    since = datetime.datetime.now(datetime.UTC)
    killed_at = time.monotonic()
    kill(cluster, pod, how)
    scale(cluster, namespace, "probe", 2)  # a change that waits for a leader

    new = wait_for(
        "another replica to take the Lease",
        lambda: (identity := holder(cluster)) not in (None, old) and identity,
        timeout=90,
    )
    took = time.monotonic() - killed_at
    wait_for(
        "the change carried out by the new leader",
        lambda: deployment_replicas(cluster, namespace, "probe") == 2,
        timeout=30,
    )
    print(f"{how}: the Lease changed hands {took:.1f} s after the kill")
    assert took <= TAKEOVER_BOUND, f"{how}: took over after {took:.1f} s"
    if how == "force-delete":
        # The kubelet stops the container with SIGTERM: the leader releases the Lease at
        # once instead of letting it run out.
        assert took <= 2 * RETRY_SECONDS + 8, f"released, yet took over after {took:.1f} s"

    # The killed replica wrote nothing after the new leader's first write.
    assert writers_in_turn(cluster, since) in ([old, new], [new]), writers_in_turn(cluster, since)

    if how in ("SIGKILL", "OOMKill"):  # the same pod, its container restarted
        ended = wait_for("the killed container's last state", lambda: last_end(cluster, pod))
        assert ended["exitCode"] == 137, ended
        assert ended["reason"] == ("OOMKilled" if how == "OOMKill" else "Error"), ended
    settled_leader(cluster)  # both Ready again for the next test


def test_a_rollout_restart_hands_over_without_two_writers_or_a_freeze(
    cluster: Cluster, two_replicas: None, namespace: str
) -> None:
    """``kubectl rollout restart`` replaces both replicas, one at a time (maxSurge 1,
    maxUnavailable 0): a new pod starts as a standby, an old one stops, and a stopping leader
    releases the Lease. Meanwhile a ModelDeployment's replicas change again and again; each
    change is carried out within the Lease's bound, and the audit log never shows two
    writers in turns."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(cpu_model("probe")))
    wait_for("probe's Deployment", lambda: deployment_replicas(cluster, namespace, "probe") == 1)
    settled_leader(cluster)
    before = {p["metadata"]["name"] for p in operator_pods(cluster)}
    since = datetime.datetime.now(datetime.UTC)
    cluster.kubectl("rollout", "restart", "deployment", "-n", OPERATOR_NAMESPACE, "modeldeploy")

    def rolled() -> bool:
        pods = ready_pods(cluster)
        return len(pods) == 2 and not {p["metadata"]["name"] for p in pods} & before

    def new_leader() -> bool:
        identity = holder(cluster) or ""
        return rolled() and identity.split("_")[0] not in before

    waits: list[float] = []
    count = 1
    deadline = time.monotonic() + 300
    led = 0  # changes carried out since a new replica leads
    while led < 2:
        assert time.monotonic() < deadline, "no new replica led within 5 minutes"
        leading = new_leader()
        count = 3 - count  # 2, 1, 2, ...
        changed = time.monotonic()
        scale(cluster, namespace, "probe", count)
        wait_for(
            f"replicas {count} carried out",
            lambda: deployment_replicas(cluster, namespace, "probe") == count,  # noqa: B023
            timeout=90,
        )
        waits.append(time.monotonic() - changed)
        led += leading
    print(f"changes carried out in {', '.join(f'{w:.1f}' for w in waits)} s")
    assert max(waits) <= TAKEOVER_BOUND, waits
    runs = writers_in_turn(cluster, since)
    assert len(runs) == len(set(runs)), f"two replicas wrote in turns: {runs}"
    assert runs[-1] == holder(cluster), runs  # the new leader wrote last
