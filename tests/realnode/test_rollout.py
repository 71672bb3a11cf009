"""Canary rollouts on real pods: pods take seconds to become Ready here (fetch, Triton start,
model load, probes), which the simulated nodes hide. A steady client talks to the Service the
whole time; Prometheus scrapes the real sidecars; the chart's operator pod decides."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from localcluster import Cluster
from localcluster.dataplane import service_address
from realnode_support import (
    CapacityWatch,
    SteadyLoad,
    answering,
    iris,
    last_history,
    md_status,
    plugin,
    pods,
    promoted,
    ready,
)
from support import condition, get, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.realnode]


def roll_to(cluster: Cluster, namespace: str, version: str) -> None:
    patch = {
        "spec": {"model": {"version": version, "storageUri": f"pvc://model-store/iris/{version}"}}
    }
    cluster.kubectl("patch", "md", "iris", "-n", namespace, "--type=merge", "-p", json.dumps(patch))


def serve_version_1(cluster: Cluster, namespace: str, replicas: int, **spec: Any) -> str:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=iris("1", replicas, **spec))
    wait_for("iris Ready", lambda: ready(cluster, namespace), timeout=240)
    address = service_address(cluster, namespace, "iris")
    wait_for("version 1 answering", lambda: answering(address, "1"), timeout=30)
    return address


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_healthy_canary_under_steady_load_is_promoted_without_a_failed_request(
    cluster: Cluster, chart_operator: None, namespace: str, store: Path, replicas: int
) -> None:
    """Stable shrinks only as canary pods become Ready, promotion hands over pod by pod, and
    leaving pods drain: with one extra pod of surge, nothing a client sends fails."""
    address = serve_version_1(cluster, namespace, replicas=replicas)
    # The EndpointSlice controller follows pod readiness a moment later: measure from when
    # every stable pod is behind the Service, as a client sees it.
    behind = CapacityWatch(cluster, namespace)
    wait_for("every stable pod behind the Service", lambda: behind.ready_endpoints() == replicas)
    with CapacityWatch(cluster, namespace) as capacity, SteadyLoad(address) as load:
        wait_for("a few answers before the change", lambda: len(load.outcomes) >= 20)
        roll_to(cluster, namespace, "2")
        wait_for("version 2 promoted", lambda: promoted(cluster, namespace, "2"), timeout=300)
        wait_for(
            "version 2 answering alone",
            lambda: [o.version for o in load.outcomes[-20:]] == ["2"] * 20,
            timeout=60,
        )
    assert last_history(cluster, namespace)["result"] == "Promoted"
    versions = {o.version for o in load.outcomes if o.ok}
    assert versions == {"1", "2"}, versions  # both versions served during the rollout
    assert load.failures == [], load.failures[:5]
    assert len(load.outcomes) > 100
    # Never fewer pods serving than the user asked for.
    assert capacity.minimum >= replicas, capacity.samples


def test_a_bad_canary_is_rolled_back_and_stable_answers_every_request(
    cluster: Cluster, chart_operator: None, namespace: str, store: Path
) -> None:
    address = serve_version_1(cluster, namespace, replicas=2)
    with SteadyLoad(address) as load:
        roll_to(cluster, namespace, "3")  # loads, then fails every inference
        wait_for(
            "the canary rolled back",
            lambda: last_history(cluster, namespace).get("result") == "RolledBack",
            timeout=240,
        )
        wait_for(
            "no canary pod left",
            lambda: (
                not [
                    p
                    for p in pods(cluster, namespace)
                    if p["metadata"]["labels"].get("serving.modeldeploy.io/track") == "canary"
                ]
            ),
            timeout=90,
        )
        rolled_back = len(load.outcomes)
        wait_for("50 answers after the rollback", lambda: len(load.outcomes) >= rolled_back + 50)
    history = last_history(cluster, namespace)
    assert history["version"] == "3"
    assert "errors" in history.get("reason", "") or "ErrorRatio" in history.get("reason", "")
    assert load.failures, "the broken canary never answered a request"  # it was judged on them
    after = load.outcomes[rolled_back:]
    assert all(o.ok and o.version == "1" for o in after), [o for o in after if not o.ok][:5]
    status = md_status(cluster, namespace)
    assert status["stable"]["version"] == "1"
    assert status["phase"] in ("RolledBack", "Degraded", "Available")


def test_a_stable_pod_killed_mid_canary_is_replaced_and_the_rollout_goes_on(
    cluster: Cluster, chart_operator: None, namespace: str, store: Path
) -> None:
    steps = {"steps": [{"weight": 50, "pause": "manual"}, {"weight": 100}]}
    rollout = {**json.loads(iris())["spec"]["rollout"], **steps}
    address = serve_version_1(cluster, namespace, replicas=2, rollout=rollout)
    roll_to(cluster, namespace, "2")

    def stable_pods() -> list[dict[str, Any]]:
        return [
            p
            for p in pods(cluster, namespace)
            if p["metadata"]["labels"].get("serving.modeldeploy.io/track") == "stable"
            and not p["metadata"].get("deletionTimestamp")
        ]

    def paused_at_half() -> bool:
        canary = md_status(cluster, namespace).get("canary") or {}
        ready_canary = [
            p
            for p in pods(cluster, namespace)
            if p["metadata"]["labels"].get("serving.modeldeploy.io/track") == "canary"
            and all(c.get("ready") for c in p["status"].get("containerStatuses", []))
        ]
        # Stable gave up its second pod once the canary's was Ready.
        return canary.get("weight") == 50 and bool(ready_canary) and len(stable_pods()) == 1

    wait_for("the canary paused at 50 %", paused_at_half, timeout=240)
    (stable,) = stable_pods()
    killed = stable["metadata"]["name"]
    cluster.kubectl(
        "delete", "pod", killed, "-n", namespace, "--grace-period=0", "--force", check=False
    )

    def replaced() -> bool:
        now = [
            p
            for p in pods(cluster, namespace)
            if p["metadata"]["labels"].get("serving.modeldeploy.io/track") == "stable"
            and p["metadata"]["name"] != killed
            and all(c.get("ready") for c in p["status"].get("containerStatuses", []))
        ]
        return bool(now)

    step = md_status(cluster, namespace)["canary"]["step"]
    wait_for("a new stable pod Ready", replaced, timeout=180)
    # The rollout stayed put: same step, neither promoted nor rolled back; the traffic share
    # (ready canary pods over ready pods) is back at 50 % once the replacement serves.
    wait_for(
        "the canary back at 50 %",
        lambda: (md_status(cluster, namespace).get("canary") or {}).get("weight") == 50,
        timeout=60,
    )
    canary = md_status(cluster, namespace)["canary"]
    assert canary["step"] == step
    assert canary["version"] == "2"
    assert last_history(cluster, namespace).get("result") != "RolledBack"
    plugin(cluster, "promote", "iris", "-n", namespace)
    wait_for("version 2 promoted", lambda: promoted(cluster, namespace, "2"), timeout=240)
    assert last_history(cluster, namespace)["result"] == "Promoted"
    # Promotion replaces the stable pods; version 2 answers alone once they are gone.
    wait_for(
        "version 2 answering alone",
        lambda: all(answering(address, "2") for _ in range(10)),
        timeout=120,
    )


def test_a_broken_stable_does_not_hold_a_good_canary_back(
    cluster: Cluster, chart_operator: None, namespace: str, store: Path
) -> None:
    """Case #10, a broken stable beside a good canary. Version 1's files go from the store and
    its pod is deleted: the replacement cannot fetch them, and nothing answers (Degraded,
    ModelFetchFailed). Version 2, good, rolls out as a canary under analysis. The rollout
    neither waits for stable to be healthy (Argo Rollouts' stuck rollouts, argo-rollouts#1774)
    nor blames the canary for it: the canary is judged on its own traffic, passes its steps
    and is promoted, and promotion replaces the broken stable pod. (With one replica the
    canary's Ready pod takes the broken stable pod's place at once: the capacity rule counts
    Ready pods, not Deployments.)"""
    address = serve_version_1(cluster, namespace, replicas=1)
    shutil.rmtree(store / "iris" / "1")
    (serving,) = pods(cluster, namespace)
    cluster.kubectl("delete", "pod", serving["metadata"]["name"], "-n", namespace)

    def degraded_by(reason: str) -> bool:
        found = condition(get(cluster, namespace, "md", "iris"), "Degraded")
        return found is not None and found["status"] == "True" and found["reason"] == reason

    wait_for("stable Degraded: its model is gone", lambda: degraded_by("ModelFetchFailed"), 180)
    assert not answering(address)

    roll_to(cluster, namespace, "2")
    with SteadyLoad(address) as load:
        wait_for(
            "the canary analysed while stable is broken",
            lambda: (md_status(cluster, namespace).get("canary") or {}).get("passedChecks", 0) >= 1,
            timeout=240,
        )
        wait_for("version 2 promoted", lambda: promoted(cluster, namespace, "2"), timeout=240)
        wait_for("iris Ready", lambda: ready(cluster, namespace), timeout=180)
        served = len(load.outcomes)
        wait_for("20 answers after promotion", lambda: len(load.outcomes) >= served + 20)
    assert [h["result"] for h in md_status(cluster, namespace)["history"]] == ["Promoted"]
    assert all(o.ok and o.version == "2" for o in load.outcomes[served:])
    assert any(o.ok for o in load.outcomes[:served])  # the canary served before promotion
    found = condition(get(cluster, namespace, "md", "iris"), "Degraded")
    assert found is not None
    assert found["status"] == "False", found
