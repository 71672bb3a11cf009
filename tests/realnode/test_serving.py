"""Serving on real pods: the chart's operator pod, Triton, the sidecar and the fetcher run our
images on the real node, and a model answers through its Service."""

from __future__ import annotations

import datetime
import json
import re
import socket
import time
from pathlib import Path

import pytest

from localcluster import Cluster
from localcluster.dataplane import OPERATOR_NAMESPACE, infer, operator_pod, service_address
from localcluster.realnode import RealNodeSpec
from realnode_support import SETOSA, VIRGINICA, answering, iris, pods, ready, sidecar_metrics
from support import DELETE, condition, get, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.realnode]


def test_the_charts_operator_pod_runs_on_the_real_node_with_its_service_account(
    cluster: Cluster, chart_operator: None, real_node: RealNodeSpec
) -> None:
    """The two start-up bugs of the operator image: no passwd entry for its UID (kopf asked
    for the user name and crashed) and `Bearer bearer <jwt>` (401 on every watch)."""
    pod = operator_pod(cluster)
    assert pod is not None, "no running operator pod"
    assert pod["spec"]["nodeName"] == real_node.name
    statuses = pod["status"]["containerStatuses"]
    assert [s["restartCount"] for s in statuses] == [0]
    assert statuses[0]["ready"] is True
    name = pod["metadata"]["name"]
    log = wait_for(
        "the operator's start in its log",
        lambda: (
            text
            if "Starting modeldeploy operator"
            in (text := cluster.kubectl("logs", "-n", OPERATOR_NAMESPACE, name).stdout)
            else None
        ),
        timeout=30,
    )
    assert "getpwuid" not in log
    assert "401" not in log
    assert "Unauthorized" not in log


def test_a_model_answers_from_a_real_pod_and_logs_and_exec_work(
    cluster: Cluster, chart_operator: None, namespace: str, store: Path, real_node: RealNodeSpec
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=iris())
    wait_for("iris Ready", lambda: ready(cluster, namespace), timeout=240)

    (pod,) = pods(cluster, namespace)
    spec, status = pod["spec"], pod["status"]
    assert spec["nodeName"] == real_node.name
    assert status["podIP"].startswith(real_node.pod_cidr.rsplit(".", 1)[0] + ".")
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"

    address = service_address(cluster, namespace, "iris")
    wait_for("the Service answering", lambda: answering(address), timeout=30)
    setosa, virginica = infer(address, "iris", [SETOSA, VIRGINICA])
    assert max(range(3), key=lambda i: setosa[i]) == 0
    assert max(range(3), key=lambda i: virginica[i]) == 2
    assert sum(setosa) == pytest.approx(1.0, abs=1e-5)

    # The sidecar is the only door: Triton's own ports are closed on the pod's address.
    for port in (8000, 8001, 8002):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((status["podIP"], port), timeout=5).close()
    socket.create_connection((status["podIP"], 8080), timeout=5).close()
    triton = next(c for c in spec["containers"] if c["name"] == "triton")
    assert "--http-address=127.0.0.1" in triton["args"]
    assert triton["readinessProbe"]["httpGet"] == {
        "path": "/triton/ready",
        "port": 9090,
        "scheme": "HTTP",
    }

    name = pod["metadata"]["name"]
    triton_log = cluster.kubectl("logs", "-n", namespace, name, "-c", "triton").stdout
    assert re.search(r"\|\s*iris\s*\|\s*1\s*\|\s*READY", triton_log), triton_log[-2000:]
    fetch_log = cluster.kubectl("logs", "-n", namespace, name, "-c", "fetch-model").stdout
    assert "iris" in fetch_log
    listed = cluster.kubectl(
        "exec", "-n", namespace, name, "-c", "runtime", "--", "ls", "/etc/hostname"
    )
    assert listed.stdout.strip() == "/etc/hostname"
    # The sidecar measured the inference it proxied.
    metrics = sidecar_metrics(cluster, namespace, name)
    assert re.search(r'modeldeploy_runtime_requests_total\{[^}]*code="200"[^}]*\} [1-9]', metrics)


def test_a_model_that_fails_to_fetch_or_to_load_says_why(
    cluster: Cluster, chart_operator: None, namespace: str, store: Path
) -> None:
    missing = json.loads(iris(name="iris-missing"))
    missing["spec"]["model"]["storageUri"] = "pvc://model-store/iris/404"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(missing))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=iris("4", name="iris-broken"))

    def degraded(name: str, reason: str) -> dict[str, object] | None:
        found = condition(get(cluster, namespace, "md", name), "Degraded")
        if found is not None and found["status"] == "True" and found["reason"] == reason:
            return found
        return None

    fetch = wait_for(
        "ModelFetchFailed", lambda: degraded("iris-missing", "ModelFetchFailed"), timeout=180
    )
    assert "iris/404 does not exist on the claim" in str(fetch["message"])
    load = wait_for(
        "ModelLoadFailed", lambda: degraded("iris-broken", "ModelLoadFailed"), timeout=240
    )
    message = str(load["message"])
    assert "Triton could not load the model" in message
    assert "failed to load" in message
    # Triton's own cause: in the message, or in the log the message points to.
    if "weights.npz not found next to model.py" not in message:
        (broken,) = pods(cluster, namespace, "iris-broken")
        pointer = f"kubectl logs {broken['metadata']['name']} -c triton --previous"
        assert pointer in message
        previous = cluster.kubectl(*pointer.split()[1:], "-n", namespace).stdout
        assert "weights.npz not found next to model.py" in previous
    for name in ("iris-missing", "iris-broken"):
        assert not ready(cluster, namespace, name)
        assert all(
            not all(c.get("ready") for c in p["status"].get("containerStatuses", []))
            for p in pods(cluster, namespace, name)
        )


def test_a_bad_update_of_a_healthy_model_is_degraded_while_the_old_pod_serves(
    cluster: Cluster, chart_operator: None, namespace: str, store: Path
) -> None:
    """Reliability case 5: a healthy iris (a Rolling update, no canary to catch it) is
    updated to a version whose folder does not exist. The API server cannot know that, so
    the status says it: Degraded, ModelFetchFailed, with the fetcher's message. Meanwhile the
    old pod goes on answering as version 1 (the new pod never becomes Ready, and the update
    surges rather than takes a pod away), and the operator does not loop: the status holds
    through the fetcher's retries (it was rewritten at each one, Degraded to Progressing and
    back), so hardly a write while the new pod's fetcher fails again and again."""
    rolling = {"strategy": "Rolling", "steps": DELETE, "analysis": DELETE}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=iris(rollout=rolling))
    wait_for("iris Ready", lambda: ready(cluster, namespace), timeout=240)
    address = service_address(cluster, namespace, "iris")
    wait_for("version 1 answering", lambda: answering(address, "1"), timeout=30)

    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=iris("404", rollout=rolling))

    def fetch_failed() -> dict[str, object] | None:
        found = condition(get(cluster, namespace, "md", "iris"), "Degraded")
        if found is not None and (found["status"], found["reason"]) == ("True", "ModelFetchFailed"):
            return found
        return None

    found = wait_for("ModelFetchFailed", fetch_failed, timeout=180)
    assert "iris/404 does not exist on the claim" in str(found["message"])
    started = datetime.datetime.now(datetime.UTC)
    for _ in range(15):  # 30 s: the old pod answers every time, as version 1
        assert answering(address, "1")
        time.sleep(2)
    assert ready(cluster, namespace)  # capacity kept: one replica available of one
    writes = [
        e
        for e in cluster.audit_events()
        if e["userAgent"].startswith("modeldeploy-operator/")
        and e["objectRef"].get("namespace") == namespace
        and e["verb"] not in ("get", "list", "watch")
        and datetime.datetime.fromisoformat(e["requestReceivedTimestamp"]) > started
    ]
    print(f"{len(writes)} writes by the operator in 30 s of a failing update")
    assert len(writes) <= 2, [(e["verb"], e["objectRef"]) for e in writes]
