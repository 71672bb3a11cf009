"""Two operators, one Lease: exactly one reconciles; when it dies mid-canary the other takes
over within the lease duration and resumes the rollout where it was.

The session's operator is stopped for these tests (it would be a third candidate, and it
watches every namespace); the pair watches the test's namespace and keeps its Lease there.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster import Cluster
from localcluster.faultproxy import FaultProxy, upstream_of
from localcluster.operator import OperatorProcess, metric_sum
from rollout_support import manual_canary, md_status, start_canary
from support import DELETE, get, load_example, merged, wait_for, writes_by_operators

pytestmark = pytest.mark.cluster

LEASE = "modeldeploy-operator"
LEASE_DURATION = 15.0  # the defaults: what a chart install runs with
MARGIN = 5.0  # a retry period (2 s) to notice, plus kopf's start and the first reconcile


def lease(cluster: Cluster, namespace: str) -> dict[str, Any]:
    found = get(cluster, namespace, "lease", LEASE)
    return {} if found is None else dict(found.get("spec", {}))


def leaders(pair: list[OperatorProcess]) -> list[OperatorProcess]:
    return [p for p in pair if p.running and p.leading()]


def canary_replicas(cluster: Cluster, namespace: str) -> int | None:
    deployment = get(cluster, namespace, "deployment", "resnet50-canary")
    return None if deployment is None else int(deployment["spec"]["replicas"])


@pytest.fixture
def relay(cluster: Cluster) -> Iterator[FaultProxy]:
    """A TCP relay to the API server that the test can cut (``localcluster.faultproxy``)."""
    proxy = FaultProxy(upstream_of(cluster.state.kubeconfig)).start()
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def pair(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    tmp_path: Path,
    relay: FaultProxy,
) -> Iterator[list[OperatorProcess]]:
    """Two operators with leader election on (the default), the session's one stopped. The
    first leads, and talks to the API server through ``relay``."""
    operator.stop()
    scope = (f"--namespace={namespace}", f"--leader-election-namespace={namespace}")
    through = relay.kubeconfig(cluster.state.kubeconfig, tmp_path / "through-relay")
    processes = [
        OperatorProcess(
            cluster, tmp_path / f"operator-{i}.log", extra_args=scope, kubeconfig=kubeconfig
        )
        for i, kubeconfig in enumerate((through, None))
    ]
    try:
        processes[0].start()
        wait_for("the first to lead", processes[0].leading, timeout=10)
        processes[1].start()
        yield processes
    finally:
        for process in processes:
            process.stop()
        operator.start()


def test_one_leads_and_a_killed_leader_is_replaced_mid_canary_at_the_same_step(
    cluster: Cluster, namespace: str, pair: list[OperatorProcess]
) -> None:
    leader = wait_for("a leader", lambda: leaders(pair), timeout=10)
    assert len(leader) == 1
    first = leader[0]
    standby = next(p for p in pair if p is not first)
    assert lease(cluster, namespace)["holderIdentity"] == first.identity()
    assert standby.identity() not in (None, first.identity())

    manifest = manual_canary()
    start_canary(cluster, namespace, manifest)
    wait_for(
        "the canary waiting at 50 %",
        lambda: (
            canary_replicas(cluster, namespace) == 1
            and (md_status(cluster, namespace).get("canary") or {}).get("weight") == 50
        ),
        timeout=30,
    )
    before = md_status(cluster, namespace)
    # The standby wrote nothing and reconciled nothing.
    idle = standby.metrics()
    assert metric_sum(idle, "modeldeploy_reconcile_duration_seconds_count") == 0
    writes = metric_sum(idle, "modeldeploy_api_requests_total", verb="APPLY|PATCH|POST|PUT|DELETE")
    assert writes == 0
    assert leaders(pair) == [first]

    assert first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    killed = time.monotonic()
    first.stop()
    wait_for("the standby to lead", standby.leading, timeout=LEASE_DURATION + MARGIN)
    takeover = time.monotonic() - killed
    print(f"takeover after SIGKILL: {takeover:.1f} s")
    assert takeover <= LEASE_DURATION + MARGIN
    spec = lease(cluster, namespace)
    assert spec["holderIdentity"] == standby.identity()
    assert spec["leaseTransitions"] == 1

    wait_for(
        "the new leader's first reconcile",
        lambda: metric_sum(standby.metrics(), "modeldeploy_reconcile_duration_seconds_count"),
        timeout=20,
    )
    print(f"first reconcile {time.monotonic() - killed - takeover:.2f} s after the takeover")
    wait_for(
        "the new leader's reconciles",
        lambda: (
            metric_sum(
                standby.metrics(), "modeldeploy_reconcile_duration_seconds_count", result="success"
            )
            >= 2
        ),
        timeout=20,
    )
    time.sleep(2 * standby.resync_seconds)  # resyncs at a manual step change nothing
    after = md_status(cluster, namespace)
    for field in ("step", "stepStarted", "started", "revision", "weight", "version"):
        assert after["canary"].get(field) == before["canary"].get(field), field
    assert after.get("history", []) == before.get("history", [])
    assert canary_replicas(cluster, namespace) == 1

    cluster.kubectl(
        "annotate", "md", "resnet50", "-n", namespace, "serving.modeldeploy.io/command=promote"
    )
    wait_for(
        "promotion",
        lambda: md_status(cluster, namespace).get("stable", {}).get("version") == "2",
        timeout=30,
    )
    history = md_status(cluster, namespace)["history"]
    assert [(h["version"], h["result"]) for h in history] == [("2", "Promoted")]


def test_a_stopped_leader_hands_the_lease_over_at_once(
    cluster: Cluster, namespace: str, pair: list[OperatorProcess]
) -> None:
    first = wait_for("a leader", lambda: leaders(pair), timeout=10)[0]
    standby = next(p for p in pair if p is not first)
    stopped = time.monotonic()
    assert first.stop() == 0
    wait_for("the standby to lead", standby.leading, timeout=10)
    handover = time.monotonic() - stopped
    print(f"handover after SIGTERM: {handover:.1f} s")
    assert handover < 5.0  # a retry period and the stop itself, not a lease duration
    log = first.log_path.read_text()
    assert "Released Lease" in log
    assert lease(cluster, namespace)["holderIdentity"] == standby.identity()


def test_a_leader_that_loses_the_lease_stops_and_exits(
    cluster: Cluster, namespace: str, pair: list[OperatorProcess]
) -> None:
    """Somebody else's name in the Lease (a partition would look the same to the leader at
    its next renewal): the leader exits 1 at once, like client-go's OnStoppedLeading."""
    first = wait_for("a leader", lambda: leaders(pair), timeout=10)[0]
    cluster.kubectl(
        "patch",
        "lease",
        LEASE,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec": {"holderIdentity": "intruder"}}',
    )
    wait_for("the leader to exit", lambda: not first.running, timeout=10)
    assert first.stop() == 1
    assert "Lost Lease" in first.log_path.read_text()


def writes_by(cluster: Cluster, identity: str) -> list[tuple[datetime.datetime, str]]:
    """The writes the API server's audit log records from the operator named ``identity``:
    (received, "VERB /uri code"), in order."""
    return [(at, what) for at, who, what in writes_by_operators(cluster) if who == identity]


@pytest.mark.parametrize("fault", ["freeze", "partition"])
def test_a_cut_off_leader_is_replaced_and_writes_nothing_when_it_comes_back(
    cluster: Cluster, namespace: str, pair: list[OperatorProcess], relay: FaultProxy, fault: str
) -> None:
    """The leader is cut off past its Lease: stopped dead (SIGSTOP: a long GC pause, a frozen
    VM) or partitioned from the API server (nothing gets through its relay). The standby
    takes over and acts on a change; the old leader comes back (thawed, or the partition
    healed) with that change waiting, and writes nothing: the API server's audit log, which
    names each replica, shows every write of the old leader before the first of the new one,
    and none after it came back."""
    first, standby = pair
    assert first.leading()
    old, new = first.identity(), standby.identity()
    assert old
    assert new
    model = merged(load_example("minimal.yaml"), {"spec": {"resources": {"gpu": DELETE}}})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(model))
    wait_for(
        "the leader's work done",
        lambda: (
            (get(cluster, namespace, "md", "resnet50") or {}).get("status", {}).get("phase")
            == "Available"
        ),
    )
    time.sleep(1)  # its last Event posted: a write in flight at the freeze would land later
    assert writes_by(cluster, old), "the audit log does not name the leader's writes"

    assert first.pid is not None
    if fault == "freeze":
        os.kill(first.pid, signal.SIGSTOP)
    else:
        relay.partition()
    try:
        wait_for("the standby to lead", standby.leading, timeout=LEASE_DURATION + MARGIN)
        patch = json.dumps({"spec": {"replicas": 3}})
        cluster.kubectl("patch", "md", "resnet50", "-n", namespace, "--type=merge", "-p", patch)
        wait_for(
            "the new leader to scale",
            lambda: (
                (get(cluster, namespace, "deployment", "resnet50-stable") or {})
                .get("spec", {})
                .get("replicas")
                == 3
            ),
            timeout=20,
        )
    finally:
        back = datetime.datetime.now(datetime.UTC)
        if fault == "freeze":
            os.kill(first.pid, signal.SIGCONT)
        else:
            relay.heal()
    wait_for("the old leader to exit", lambda: not first.running, timeout=30)
    assert first.stop() == 1
    assert "Lost Lease" in first.log_path.read_text()
    olds, news = writes_by(cluster, old), writes_by(cluster, new)
    assert [w for at, w in olds if at >= back] == []
    assert olds[-1][0] < news[0][0], (olds[-1], news[0])  # never two writers at once
    assert any("/deployments/resnet50-stable" in w for _, w in news)
    assert lease(cluster, namespace)["holderIdentity"] == new
