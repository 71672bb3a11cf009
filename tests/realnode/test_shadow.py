"""Shadow steps on real pods: real Triton servers (stable and canary), real sidecars, the real
control plane and Prometheus, the chart's operator pod. A steady client talks to the Service
the whole time; examples/iris-shadow.yaml copies half of its requests to the canary.

- version 5 is fast and never fails but swaps two classes: it is rolled back in the shadow
  step, the condition names the output and the value, and the canary's Triton counted exactly
  the copies stable's sidecars sent it: no user request reached it;
- then version 2, which answers like version 1 (the same class, probabilities within 25 %),
  passes its shadow step, then its weighted steps, and is promoted.

One test, one version 1 brought up: a real-pod rollout costs minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from localcluster import Cluster
from localcluster.dataplane import service_address
from realnode_support import (
    Outcome,
    SteadyLoad,
    answering,
    last_history,
    md_status,
    pods,
    promoted,
    ready,
)
from support import condition, get, load_example, merged, wait_for
from triton_support import Samples, scrape, value

pytestmark = [pytest.mark.cluster, pytest.mark.realnode]

TRACK = "serving.modeldeploy.io/track"
GATE = "serving.modeldeploy.io/serving"


def serve(cluster: Cluster, namespace: str, failure_limit: int = 2) -> str:
    manifest = merged(
        load_example("iris-shadow.yaml"),
        {
            "metadata": {"namespace": namespace},
            "spec": {"rollout": {"analysis": {"failureLimit": failure_limit}}},
        },
    )
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
    wait_for("iris Ready", lambda: ready(cluster, namespace), timeout=240)
    address = service_address(cluster, namespace, "iris")
    wait_for("version 1 answering", lambda: answering(address, "1"), timeout=30)
    return address


def roll_to(cluster: Cluster, namespace: str, version: str) -> None:
    patch = {
        "spec": {"model": {"version": version, "storageUri": f"pvc://model-store/iris/{version}"}}
    }
    cluster.kubectl("patch", "md", "iris", "-n", namespace, "--type=merge", "-p", json.dumps(patch))


def track_pods(cluster: Cluster, namespace: str, track: str) -> list[dict[str, Any]]:
    return [
        p
        for p in pods(cluster, namespace)
        if p["metadata"]["labels"].get(TRACK) == track
        and not p["metadata"].get("deletionTimestamp")
    ]


def sidecar_metrics(pod: dict[str, Any]) -> Samples:
    return scrape(f"{pod['status']['podIP']}:9090")


def copies_sent(cluster: Cluster, namespace: str) -> float:
    """Copies stable's sidecars sent to the canary rolling out now that its door let through
    to Triton (the series of an earlier canary's revision are not counted)."""
    revision = (md_status(cluster, namespace).get("canary") or {}).get("revision")
    if revision is None:
        return 0.0
    return sum(
        value(
            sidecar_metrics(p),
            "modeldeploy_runtime_shadow_requests_total",
            result=result,
            revision=revision,
        )
        for p in track_pods(cluster, namespace, "stable")
        for result in ("compared", "error", "timeout")
    )


def shadowing(cluster: Cluster, namespace: str) -> bool:
    canary = md_status(cluster, namespace).get("canary") or {}
    return canary.get("shadow") == 50 and canary.get("weight") == 0


def shadow_step_copying(cluster: Cluster, namespace: str, version: str) -> dict[str, Any]:
    """``version`` rolled out to its shadow step, stable's sidecars copying to its pod."""
    roll_to(cluster, namespace, version)
    wait_for("the shadow step", lambda: shadowing(cluster, namespace), timeout=120)
    wait_for(
        "stable copying to the canary", lambda: copies_sent(cluster, namespace) >= 10, timeout=240
    )
    (canary,) = track_pods(cluster, namespace, "canary")
    return canary


def only_copies_reached(
    cluster: Cluster, namespace: str, canary: dict[str, Any], outcomes: list[Outcome]
) -> None:
    """The canary's Triton (its statistics, read every 5 s) counted exactly the copies
    stable's sidecars sent it, once the client has paused and every copy is answered."""
    counts: list[tuple[float, float]] = []  # (the canary's Triton, stable's copies)

    def counts_agree() -> bool:
        inferred = value(sidecar_metrics(canary), "modeldeploy_runtime_triton_inference_count")
        counts.append((inferred, copies_sent(cluster, namespace)))
        return inferred > 0 and inferred == counts[-1][1]

    deadline = time.monotonic() + 30
    while not counts_agree():
        stable = [
            {k: v for k, v in sidecar_metrics(p).items() if "shadow_requests_total" in k[0]}
            for p in track_pods(cluster, namespace, "stable")
        ]
        door = {k: v for k, v in sidecar_metrics(canary).items() if "requests_total" in k[0]}
        versions = {o.version for o in outcomes}
        assert time.monotonic() < deadline, (
            f"(canary Triton, copies): {counts[-3:]} {stable} {door} {versions}"
        )
        time.sleep(1)


def test_a_canary_that_answers_differently_is_rolled_back_and_one_that_agrees_is_promoted(
    cluster: Cluster, chart_operator: None, namespace: str, store: Path
) -> None:
    # Five failed checks (50 s) leave the canary up long enough to read its counts.
    address = serve(cluster, namespace, failure_limit=5)
    with SteadyLoad(address) as load:
        canary = shadow_step_copying(cluster, namespace, "5")  # fast, no errors, classes swapped
    # The client paused: every copy is answered and counted on both sides.
    only_copies_reached(cluster, namespace, canary, load.outcomes)
    with SteadyLoad(address) as load_after:
        wait_for(
            "the canary rolled back",
            lambda: last_history(cluster, namespace).get("result") == "RolledBack",
            timeout=240,
        )
    history = last_history(cluster, namespace)
    assert history["version"] == "5"
    assert "output probabilities" in history["reason"], history["reason"]
    assert "disagreement" in history["reason"] or "output-error" in history["reason"]
    degraded = condition(get(cluster, namespace, "md", "iris"), "Degraded")
    assert degraded is not None
    assert degraded["reason"] == "RolledBack"
    assert "output probabilities" in degraded["message"], degraded
    # No user ever got an answer from version 5 (version_of tells 1 and 2 apart; 5's swapped
    # probabilities are neither).
    every = load.outcomes + load_after.outcomes
    assert every, "no client traffic"
    assert all(o.ok and o.version == "1" for o in every), [o for o in every if o.version != "1"][:5]
    status = md_status(cluster, namespace)
    assert status["stable"]["version"] == "1"
    assert status["rollback"]["revision"]
    wait_for("no canary pod left", lambda: not track_pods(cluster, namespace, "canary"), timeout=90)

    # Version 2 answers like version 1: it passes its shadow step and is promoted, the same
    # pods let in after it.
    with SteadyLoad(address) as load:
        canary = shadow_step_copying(cluster, namespace, "2")
        # The canary's pods are loaded and behind the gate: not Ready, in no Service.
        conditions = {c["type"]: c["status"] for c in canary["status"]["conditions"]}
        assert conditions["ContainersReady"] == "True"
        assert conditions["Ready"] == "False"
        assert conditions.get(GATE) != "True"
        in_shadow = len(load.outcomes)
        wait_for(
            "past the shadow step",
            lambda: (
                (md_status(cluster, namespace).get("canary") or {}).get("step", 0) >= 1
                or promoted(cluster, namespace, "2")
            ),
            timeout=240,
        )
        # While shadowing, every answer came from version 1.
        shadowed = load.outcomes[:in_shadow]
        assert {o.version for o in shadowed if o.ok} == {"1"}
        wait_for("version 2 promoted", lambda: promoted(cluster, namespace, "2"), timeout=300)
        wait_for(
            "version 2 answering alone",
            lambda: [o.version for o in load.outcomes[-20:]] == ["2"] * 20,
            timeout=90,
        )
    assert last_history(cluster, namespace)["result"] == "Promoted"
    assert load.failures == [], load.failures[:5]
    analysis = {r["name"]: r for r in md_status(cluster, namespace).get("analysis", [])}
    assert "disagreement" not in analysis  # weighted steps do not measure the shadow metrics
