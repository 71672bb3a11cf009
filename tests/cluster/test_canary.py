"""Canary rollouts on the real control plane, with the operator as a process.

These rollouts have no analysis (no Prometheus in this tier): they prove the mechanics
(canary Deployment, replica split, steps, promotion, manual control, crash safety).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import Cluster
from localcluster.operator import OperatorProcess, free_port, metric_sum
from modeldeploy_operator.api.v1alpha1 import API_VERSION, KIND
from modeldeploy_operator.k8s.client import ApiError, KubernetesApi, load_api_client
from rollout_support import StatusRecorder, canary_exists, md_status, set_version, start_canary
from support import DELETE, condition, get, load_example, merged, wait_for

pytestmark = pytest.mark.cluster

VERSION_LABEL = "app.kubernetes.io/version"


def model(steps: list[dict[str, Any]]) -> dict[str, Any]:
    return merged(
        load_example("minimal.yaml"),
        {
            "spec": {
                "replicas": 2,
                "resources": {"gpu": DELETE},
                "rollout": {"strategy": "Canary", "steps": steps},
            }
        },
    )


def status(cluster: Cluster, namespace: str) -> dict[str, Any]:
    return md_status(cluster, namespace)


def start(cluster: Cluster, namespace: str, steps: list[dict[str, Any]]) -> None:
    """Version 1 Available, then version 2 applied: a canary starts."""
    start_canary(cluster, namespace, model(steps))


def canary_replicas(cluster: Cluster, namespace: str) -> int | None:
    deployment = get(cluster, namespace, "deployment", "resnet50-canary")
    return None if deployment is None else int(deployment["spec"]["replicas"])


def stable_replicas(cluster: Cluster, namespace: str) -> int | None:
    deployment = get(cluster, namespace, "deployment", "resnet50-stable")
    return None if deployment is None else int(deployment["spec"]["replicas"])


def stable_version(cluster: Cluster, namespace: str) -> str:
    deployment = get(cluster, namespace, "deployment", "resnet50-stable") or {}
    return str(deployment["spec"]["template"]["metadata"]["labels"][VERSION_LABEL])


def test_a_healthy_canary_goes_through_every_step_and_is_promoted(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    start(cluster, namespace, [{"weight": 50, "pause": "2s"}, {"weight": 100}])
    wait_for("the canary at 50 %", lambda: canary_replicas(cluster, namespace) == 1, timeout=20)
    # The canary is created first and the stable scaled down after it in the same pass (no
    # capacity dip), so the stable follows a moment later: then no extra pods.
    wait_for("the stable scaled to match", lambda: stable_replicas(cluster, namespace) == 1, 10)
    assert stable_version(cluster, namespace) == "1"
    during = status(cluster, namespace)
    assert during["phase"] == "Progressing"
    assert during["stable"]["version"] == "1"
    assert during["canary"]["version"] == "2"

    wait_for(
        "promotion",
        lambda: status(cluster, namespace).get("stable", {}).get("version") == "2",
        timeout=60,
    )
    done = status(cluster, namespace)
    assert "canary" not in done
    assert done["history"][-1]["result"] == "Promoted"
    assert done["history"][-1]["version"] == "2"
    assert stable_version(cluster, namespace) == "2"
    wait_for(
        "the canary Deployment gone",
        lambda: canary_replicas(cluster, namespace) is None,
        timeout=20,
    )
    wait_for(
        "Available again",
        lambda: status(cluster, namespace).get("phase") == "Available",
        timeout=30,
    )


def test_a_concurrent_writer_costs_the_operator_conflicts_but_no_step_nor_update(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """Reliability case 11. While a canary goes through four timed steps, another client
    writes to the same ModelDeployment every few milliseconds (an annotation: it moves the
    resourceVersion the operator's status writes are preconditioned on). The operator meets
    409s from the real API server, reads again and decides again: each step starts once, in
    order, the rollout is promoted once, and every write of the other client stays."""
    steps = [{"weight": w, "pause": "2s"} for w in (25, 50, 75)] + [{"weight": 100}]
    start(cluster, namespace, steps)
    api = KubernetesApi(load_api_client(str(cluster.state.kubeconfig)))
    conflicts = metric_sum(operator.metrics(), "modeldeploy_api_requests_total", code="409")
    seen: list[tuple[int, float]] = []  # (step, stepStarted) as the writer read them
    written = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        md = api.get(API_VERSION, KIND, namespace, "resnet50") or {}
        canary = md.get("status", {}).get("canary") or {}
        if "stepStarted" in canary:
            seen.append((canary["step"], canary["stepStarted"]))
        if md.get("status", {}).get("stable", {}).get("version") == "2":
            break
        written += 1
        patch = {"metadata": {"annotations": {"example.com/writes": str(written)}}}
        api.merge_patch(API_VERSION, KIND, namespace, "resnet50", patch, "concurrent-writer")
    done = status(cluster, namespace)
    assert done["stable"]["version"] == "2", done
    assert [h["result"] for h in done["history"]] == ["Promoted"]
    # Each step started once, in order: no step redone, none skipped, none advanced twice.
    starts: dict[int, set[float]] = {}
    for step, started in seen:
        starts.setdefault(step, set()).add(started)
    assert sorted(starts) == [0, 1, 2, 3] or sorted(starts) == [0, 1, 2], starts
    assert all(len(times) == 1 for times in starts.values()), starts
    assert [step for step, _ in seen] == sorted(step for step, _ in seen)
    # Nothing of the other client's was lost.
    md = get(cluster, namespace, "md", "resnet50") or {}
    assert md["metadata"]["annotations"]["example.com/writes"] == str(written)
    met = metric_sum(operator.metrics(), "modeldeploy_api_requests_total", code="409")
    print(f"{written} concurrent writes; the operator met {met - conflicts:g} conflicts")
    assert met > conflicts


def test_conditions_follow_the_api_conventions_through_a_rollout(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """Reliability case 29, every write seen through a watch: a create, a new version held
    at a manual step, a label change, a promote, a scale. Each generation is observed within 5 s; no
    lastTransitionTime moves unless its condition's status did; every reason is CamelCase;
    CanaryHealthy exists only while the canary does; and `kubectl wait` works on Ready."""
    recorder = StatusRecorder(cluster, namespace)
    try:
        start(cluster, namespace, [{"weight": 50, "pause": "manual"}, {"weight": 100}])
        wait_for("the canary at 50 %", lambda: canary_replicas(cluster, namespace) == 1, timeout=30)
        wait_for(
            "CanaryHealthy",
            lambda: (
                ("True", "CanaryReady") in [c[:2] for c in recorder.conditions("CanaryHealthy")]
            ),
            timeout=30,
        )
        cluster.kubectl("patch", "md", "resnet50", "-n", namespace, "--type=merge",
                        "-p", json.dumps({"metadata": {"labels": {"team": "search"}}}))  # fmt: skip
        cluster.kubectl("annotate", "md", "resnet50", "-n", namespace,
                        "serving.modeldeploy.io/command=promote")  # fmt: skip
        wait_for(
            "promotion",
            lambda: status(cluster, namespace).get("stable", {}).get("version") == "2",
            timeout=60,
        )
        cluster.kubectl("scale", "md", "resnet50", "-n", namespace, "--replicas=3")
        cluster.kubectl("wait", "md/resnet50", "-n", namespace, "--for=condition=Ready",
                        "--timeout=60s")  # fmt: skip
        time.sleep(1)
    finally:
        recorder.stop()
    assert recorder.violations() == []
    generations = {generation for _, generation, _ in recorder.seen}
    assert len(generations) >= 3, generations  # version 2, then the scale
    final = recorder.seen[-1][2]
    assert "CanaryHealthy" not in {c["type"] for c in final["conditions"]}
    assert {c["type"] for c in final["conditions"]} >= {"Ready", "Progressing", "Degraded"}
    print(f"{len(recorder.seen)} writes seen; Ready went {recorder.conditions('Ready')}")


@pytest.mark.parametrize("policy", ["Pause", "Rollback"])
def test_after_inconclusive_limit_checks_without_data_the_rollout_pauses_or_rolls_back(
    cluster: Cluster, operator: OperatorProcess, namespace: str, policy: str
) -> None:
    """Reliability case 9: nothing answers at the Prometheus URL, so every check is
    inconclusive (no data, never a pass). With inconclusiveLimit 3 the rollout stops waiting
    after the third in a row: paused for a user (Pause, as Argo Rollouts does) or rolled back
    (Rollback). Never promoted either way."""
    analysis = {
        "interval": "1s",
        "inconclusiveLimit": 3,
        "onInconclusive": policy,
        "prometheus": {"url": f"http://127.0.0.1:{free_port()}"},
        "metrics": [{"name": "errors", "builtin": "ErrorRatio", "max": 0.01}],
    }
    manifest = merged(
        model([{"weight": 50}, {"weight": 100}]), {"spec": {"rollout": {"analysis": analysis}}}
    )
    start_canary(cluster, namespace, manifest)
    if policy == "Pause":
        paused = wait_for(
            "the rollout paused",
            lambda: (c := status(cluster, namespace).get("canary") or {}).get("paused") and c,
            timeout=60,
        )
        assert paused["inconclusiveChecks"] >= 3, paused
        progressing = condition({"status": status(cluster, namespace)}, "Progressing") or {}
        assert progressing["reason"] == "AnalysisInconclusive", progressing
        assert "3 inconclusive analyses in a row" in progressing["message"]
        time.sleep(3)  # paused: more checks change nothing
        assert status(cluster, namespace)["canary"]["paused"] is True
    else:
        wait_for("the canary removed", lambda: not canary_exists(cluster, namespace), timeout=60)
        rollback = status(cluster, namespace)["rollback"]
        assert rollback["reason"] == "RolledBack", rollback
        assert "inconclusive 3 times in a row" in rollback["message"], rollback
    final = status(cluster, namespace)
    assert final["stable"]["version"] == "1"
    assert not final.get("history") or final["history"][-1]["result"] != "Promoted"


def test_abort_sends_traffic_back_and_the_revision_is_not_retried(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    start(cluster, namespace, [{"weight": 50, "pause": "manual"}, {"weight": 100}])
    wait_for("the canary at 50 %", lambda: canary_replicas(cluster, namespace) == 1, timeout=20)
    cluster.kubectl(
        "annotate", "md", "resnet50", "-n", namespace, "serving.modeldeploy.io/command=abort"
    )
    wait_for("the canary removed", lambda: canary_replicas(cluster, namespace) is None, timeout=20)
    after = status(cluster, namespace)
    assert after["rollback"]["reason"] == "Aborted"
    assert after["history"][-1]["result"] == "Aborted"
    assert after["stable"]["version"] == "1"
    assert stable_version(cluster, namespace) == "1"
    wait_for(
        "stable back to 2 replicas",
        lambda: (
            (get(cluster, namespace, "deployment", "resnet50-stable") or {})["spec"]["replicas"]
            == 2
        ),
    )
    wait_for(
        "phase Degraded, reason Aborted",
        lambda: status(cluster, namespace).get("phase") == "Degraded",
    )
    md = get(cluster, namespace, "md", "resnet50") or {}
    assert "serving.modeldeploy.io/command" not in md["metadata"].get("annotations", {})
    # Resyncs do not retry the aborted revision.
    time.sleep(2 * operator.resync_seconds)
    assert canary_replicas(cluster, namespace) is None
    assert stable_version(cluster, namespace) == "1"
    # ... until someone asks for it.
    cluster.kubectl(
        "annotate", "md", "resnet50", "-n", namespace, "serving.modeldeploy.io/command=retry"
    )
    wait_for("the canary back", lambda: canary_replicas(cluster, namespace) == 1, timeout=20)
    retried = status(cluster, namespace)
    assert "rollback" not in retried
    assert retried["canary"]["version"] == "2"


def test_manual_promote_skips_the_remaining_steps(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    start(
        cluster,
        namespace,
        [{"weight": 50, "pause": "manual"}, {"weight": 75, "pause": "1h"}, {"weight": 100}],
    )
    wait_for("the canary at 50 %", lambda: canary_replicas(cluster, namespace) == 1, timeout=20)
    cluster.kubectl(
        "annotate", "md", "resnet50", "-n", namespace, "serving.modeldeploy.io/command=promote"
    )
    wait_for(
        "promotion",
        lambda: status(cluster, namespace).get("stable", {}).get("version") == "2",
        timeout=30,
    )
    # The decision is written first; stable's Deployment follows it.
    wait_for("stable rolled to 2", lambda: stable_version(cluster, namespace) == "2", timeout=30)


def kill_and_restart(operator: OperatorProcess) -> None:
    assert operator.pid is not None
    os.kill(operator.pid, signal.SIGKILL)
    operator.stop()
    operator.start()


def test_a_killed_operator_resumes_the_same_step(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """SIGKILL at three stages: in a timed pause, right after an advance (at a manual step),
    and at the last step; each time the same step, pause and start resume, nothing advances
    twice."""
    start(
        cluster,
        namespace,
        [
            {"weight": 25, "pause": "6s"},
            {"weight": 50, "pause": "manual"},
            {"weight": 100, "pause": "5s"},
        ],
    )
    wait_for("step 1", lambda: canary_replicas(cluster, namespace) == 1, timeout=20)
    before = status(cluster, namespace)["canary"]
    kill_and_restart(operator)
    resumed = wait_for(
        "a reconcile after the restart",
        lambda: status(cluster, namespace).get("canary"),
        timeout=40,  # a SIGKILLed leader's Lease runs out first (15 s)
    )
    assert resumed["step"] == before["step"] == 0
    assert resumed["stepStarted"] == before["stepStarted"]  # the pause is not restarted
    assert resumed["started"] == before["started"]

    wait_for(
        "step 2",
        lambda: (status(cluster, namespace).get("canary") or {}).get("step") == 1,
        timeout=60,
    )
    at_manual = status(cluster, namespace)["canary"]
    kill_and_restart(operator)
    time.sleep(2 * operator.resync_seconds)
    again = status(cluster, namespace)["canary"]
    assert again["step"] == 1  # a manual step waits, restarts or not
    assert again["stepStarted"] == at_manual["stepStarted"]

    cluster.kubectl(
        "annotate", "md", "resnet50", "-n", namespace, "serving.modeldeploy.io/command=resume"
    )
    wait_for(
        "step 3",
        lambda: (status(cluster, namespace).get("canary") or {}).get("step") == 2,
        timeout=60,
    )
    kill_and_restart(operator)
    wait_for(
        "promotion",
        lambda: status(cluster, namespace).get("stable", {}).get("version") == "2",
        timeout=60,
    )
    assert [h["result"] for h in status(cluster, namespace)["history"]] == ["Promoted"]


def plugin(cluster: Cluster, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`kubectl modeldeploy ...` through the real kubectl, with the plugin on PATH."""
    scripts = Path(shutil.which("kubectl-modeldeploy") or sys.executable).parent
    env = {**cluster.env(), "PATH": f"{cluster.toolchain.bin_dir}:{scripts}:{os.environ['PATH']}"}
    return subprocess.run(
        ["kubectl", "modeldeploy", *args, "-n", namespace],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_kubectl_plugin_shows_and_steers_a_rollout(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    start(cluster, namespace, [{"weight": 50, "pause": "manual"}, {"weight": 100}])
    wait_for("the canary at 50 %", lambda: canary_replicas(cluster, namespace) == 1, timeout=20)
    wait_for(
        "the canary's weight in status",
        lambda: status(cluster, namespace).get("canary", {}).get("weight") == 50,
        timeout=20,
    )
    shown = plugin(cluster, namespace, "status", "resnet50")
    assert shown.returncode == 0, shown.stderr
    assert "stable   version 1" in shown.stdout
    assert "canary   version 2" in shown.stdout
    assert "step 1/2" in shown.stdout
    assert "[##########----------] 50%" in shown.stdout
    as_json = json.loads(plugin(cluster, namespace, "status", "resnet50", "-o", "json").stdout)
    assert as_json["canary"]["version"] == "2"

    promoted = plugin(cluster, namespace, "promote", "resnet50")
    assert promoted.returncode == 0, promoted.stderr
    wait_for(
        "promotion",
        lambda: status(cluster, namespace).get("stable", {}).get("version") == "2",
        timeout=30,
    )
    history = plugin(cluster, namespace, "history", "resnet50")
    assert "Promoted" in history.stdout
    missing = plugin(cluster, namespace, "status", "nope")
    assert missing.returncode == 1
    assert "not found" in missing.stderr


def test_with_prometheus_down_nothing_is_promoted_and_a_new_revision_restarts_analysis(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """Every check is inconclusive (nothing listens at the Prometheus URL): the canary must
    never be promoted, nor rolled back (no data is not a failure: the step waits, as Argo
    Rollouts pauses); a spec change mid-way starts over for the new revision."""
    dead = f"http://127.0.0.1:{free_port()}"
    analysis = {
        "interval": "1s",
        "failureLimit": 100,
        "prometheus": {"url": dead},
        "metrics": [{"name": "errors", "builtin": "ErrorRatio", "max": 0.01}],
    }
    manifest = merged(
        model([{"weight": 50}, {"weight": 100}]), {"spec": {"rollout": {"analysis": analysis}}}
    )
    start_canary(cluster, namespace, manifest)

    def inconclusive() -> bool:
        seen = status(cluster, namespace)
        reasons = [c.get("message", "") for c in seen.get("conditions", [])]
        return bool(seen.get("analysis")) and any("inconclusive" in r for r in reasons)

    wait_for("an inconclusive check", inconclusive, timeout=30)
    first = status(cluster, namespace)["canary"]
    assert first["version"] == "2"
    assert first["step"] == 0  # an unanalysed step never advances
    assert first.get("failedChecks", 0) == 0
    assert [a["result"] for a in status(cluster, namespace)["analysis"]] == ["Inconclusive"]

    set_version(cluster, namespace, "3")
    wait_for(
        "the rollout of version 3",
        lambda: (status(cluster, namespace).get("canary") or {}).get("version") == "3",
        timeout=30,
    )
    restarted = status(cluster, namespace)["canary"]
    assert restarted["revision"] != first["revision"]
    assert restarted["started"] > first["started"]
    time.sleep(3)
    final = status(cluster, namespace)
    assert final["stable"]["version"] == "1"  # never promoted
    assert final["canary"]["step"] == 0
    assert not final.get("history")


def route_weights(cluster: Cluster, namespace: str) -> dict[str, int]:
    route = get(cluster, namespace, "httproute", "resnet50") or {
        "spec": {"rules": [{"backendRefs": []}]}
    }
    return {ref["name"]: ref["weight"] for ref in route["spec"]["rules"][0]["backendRefs"]}


def test_gateway_api_routing_moves_the_httproute_weights(
    cluster: Cluster, operator: OperatorProcess, namespace: str, gateway_api: None
) -> None:
    routing = {
        "gatewayAPI": {
            "parentRefs": [{"name": "inference-gateway"}],
            "hostnames": ["models.example.com"],
        }
    }
    manifest = merged(
        model([{"weight": 20, "pause": "manual"}, {"weight": 100}]),
        {"spec": {"rollout": {"trafficRouting": routing}}},
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))
    wait_for(
        "all traffic on stable",
        lambda: route_weights(cluster, namespace) == {"resnet50-stable": 100, "resnet50-canary": 0},
    )
    route = get(cluster, namespace, "httproute", "resnet50") or {}
    assert [ref["name"] for ref in route["spec"]["parentRefs"]] == ["inference-gateway"]
    assert route["spec"]["hostnames"] == ["models.example.com"]
    for track in ("stable", "canary"):
        service = get(cluster, namespace, "service", f"resnet50-{track}") or {}
        assert service["spec"]["selector"]["serving.modeldeploy.io/track"] == track

    wait_for("version 1 Available", lambda: status(cluster, namespace).get("phase") == "Available")
    set_version(cluster, namespace, "2")
    wait_for(
        "20 % on the canary",
        lambda: route_weights(cluster, namespace) == {"resnet50-stable": 80, "resnet50-canary": 20},
        timeout=30,
    )
    assert status(cluster, namespace)["canary"]["weight"] == 20  # what the route achieves
    cluster.kubectl(
        "annotate", "md", "resnet50", "-n", namespace, "serving.modeldeploy.io/command=promote"
    )
    wait_for(
        "promotion",
        lambda: status(cluster, namespace).get("stable", {}).get("version") == "2",
        timeout=30,
    )
    wait_for(
        "all traffic back on stable",
        lambda: route_weights(cluster, namespace) == {"resnet50-stable": 100, "resnet50-canary": 0},
        timeout=20,
    )


def test_rollout_status_writes_are_preconditioned_on_the_resource_version(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """Two writers deciding from the same read cannot both write: the second gets 409."""
    start(cluster, namespace, [{"weight": 50, "pause": "manual"}, {"weight": 100}])
    wait_for("the canary at 50 %", lambda: canary_replicas(cluster, namespace) == 1, timeout=20)
    api = KubernetesApi(load_api_client(str(cluster.state.kubeconfig)))
    read = get(cluster, namespace, "md", "resnet50") or {}
    version = read["metadata"]["resourceVersion"]
    cluster.kubectl("annotate", "md", "resnet50", "-n", namespace, "example.com/touched=yes")
    with pytest.raises(ApiError) as caught:
        api.patch_status(namespace, "resnet50", {"canary": {"step": 1}}, resource_version=version)
    assert caught.value.status == 409
    assert status(cluster, namespace)["canary"]["step"] == 0
