"""Scale from zero on real pods: the chart's activator holds the requests that reach a
ModelDeployment at zero, wakes it once and answers them from the first Ready pod (Triton and
the sidecar on the real node), HTTP and gRPC; a model that never gets Ready gets its callers a
503 with Retry-After; after idle it goes back to zero; one activator replica stopped loses no
caller."""

from __future__ import annotations

import datetime
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chart_support import dashboard_queries
from localcluster import Cluster
from localcluster.dataplane import OPERATOR_NAMESPACE, RELEASE, service_address
from realnode_support import SETOSA, VIRGINICA, Answer, pods, post_infer, reaches_the_activator
from support import condition, get, load_example, merged, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.realnode]

ACTIVATOR = f"{RELEASE}-activator"
ACTIVATOR_ACCOUNT = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{ACTIVATOR}"
CALLERS = 20
WAKE_BOUND = 240.0  # seconds a caller waits: a pod's start on this shared machine, and more


def sleepy_iris(version: str = "1", **zero: Any) -> str:
    """examples/iris-scale-to-zero.yaml at 0 replicas, with ``zero`` in its scaleToZero."""
    manifest = merged(
        load_example("iris-scale-to-zero.yaml"),
        {
            "spec": {
                "model": {"version": version, "storageUri": f"pvc://model-store/iris/{version}"},
                "replicas": 0,
                "autoscaling": {"scaleToZero": zero},
            }
        },
    )
    return json.dumps(manifest)


def probabilities(answer: Answer) -> list[list[float]]:
    output = next(o for o in answer.body["outputs"] if o["name"] == "probabilities")
    flat = output["data"]
    return [flat[i : i + 3] for i in range(0, len(flat), 3)]


def concurrently(calls: list[Callable[[], Answer]]) -> list[Answer | Exception]:
    results: list[Answer | Exception] = [RuntimeError("no answer")] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as error:  # reported by the test
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAKE_BOUND + 30)
    return results


def asleep(cluster: Cluster, namespace: str, manifest: str) -> str:
    """Apply ``manifest`` (at 0 replicas) and wait until its Service reaches the activator;
    returns the Service's HTTP address."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest)
    wait_for(
        "iris at zero behind the activator",
        lambda: at_zero_behind_the_activator(cluster, namespace),
        timeout=120,
    )
    address = service_address(cluster, namespace, "iris")
    wait_for("the Service reaching the activator", lambda: reaches_the_activator(address), 30)
    return address


def activator_slice(cluster: Cluster, namespace: str) -> dict[str, Any] | None:
    found = cluster.kubectl(
        "get", "endpointslice", "iris-activator", "-n", namespace, "-o", "json", check=False
    )
    return json.loads(found.stdout) if found.returncode == 0 else None


def activator_addresses(cluster: Cluster) -> set[str]:
    listed = cluster.kubectl_json(
        "get", "pods", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/component=activator"
    )["items"]
    return {
        p["status"]["podIP"]
        for p in listed
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p["status"].get("conditions", [])
        )
    }


def at_zero_behind_the_activator(cluster: Cluster, namespace: str) -> bool:
    """ScaledToZero, no pod, and the Service's activator slice lists every Ready activator."""
    md = get(cluster, namespace, "md", "iris")
    zero = condition(md, "ScaledToZero")
    piece = activator_slice(cluster, namespace)
    if zero is None or zero["status"] != "True" or piece is None or pods(cluster, namespace):
        return False
    listed = {a for e in piece.get("endpoints", []) for a in e["addresses"]}
    expected = activator_addresses(cluster)
    return len(expected) == 2 and listed == expected


def scale_patches(cluster: Cluster, namespace: str, since: datetime.datetime) -> list[int]:
    """The answers to the activator's patches of iris's scale since ``since``."""
    return [
        int(e.get("responseStatus", {}).get("code", 0))
        for e in cluster.audit_events()
        if e["user"]["username"] == ACTIVATOR_ACCOUNT
        and e["verb"] == "patch"
        and e["objectRef"].get("subresource") == "scale"
        and e["objectRef"].get("namespace") == namespace
        and datetime.datetime.fromisoformat(e["requestReceivedTimestamp"]) > since
    ]


def prometheus_value(prometheus_url: str, query: str) -> float | None:
    import urllib.parse  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - the test's own
        result = json.load(answer)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_twenty_callers_at_zero_are_answered_after_one_wake_and_it_sleeps_again(
    cluster: Cluster, chart_operator: None, namespace: str, store: Path, prometheus_url: str
) -> None:
    address = asleep(cluster, namespace, sleepy_iris(idleAfter="40s", wakeTimeout="5m"))
    status = get(cluster, namespace, "md", "iris")["status"]  # type: ignore[index]
    assert status["activation"]["serviceIP"] == address.split(":")[0]

    since = datetime.datetime.now(datetime.UTC)
    rows = [[SETOSA], [VIRGINICA]]
    answers = concurrently(
        [lambda i=i: post_infer(address, rows[i % 2]) for i in range(CALLERS)]  # type: ignore[misc]
    )
    failed = [a for a in answers if not isinstance(a, Answer) or a.status != 200]
    assert not failed, failed
    for i, answer in enumerate(answers):
        assert isinstance(answer, Answer)
        (row,) = probabilities(answer)
        assert max(range(3), key=lambda c: row[c]) == (0 if i % 2 == 0 else 2)
    first = min(a.elapsed for a in answers if isinstance(a, Answer))
    print(f"{CALLERS} callers answered; the first after {first:.1f}s")

    # One wake: the activator raised the scale once (a second replica's try found it raised).
    codes = scale_patches(cluster, namespace, since)
    assert codes.count(200) == 1, codes
    md = get(cluster, namespace, "md", "iris")
    assert md is not None
    zero = condition(md, "ScaledToZero")
    assert zero is not None
    assert (zero["status"], zero["reason"]) == ("False", "Awake"), zero
    assert "after the scale-up from zero" in zero["message"]
    assert {"Waking", "Awake"} <= event_reasons(cluster, namespace)
    # Handed back: the activator's slice goes once the controller's lists the pod.
    wait_for(
        "the activator's slice removed",
        lambda: activator_slice(cluster, namespace) is None,
        timeout=60,
    )

    # The held requests are the model's traffic in the same series as the sidecar's.
    selector = f'namespace="{namespace}", modeldeployment="iris"'
    query = f'sum(modeldeploy_runtime_requests_total{{{selector}, track="activator"}})'

    def counted() -> float | None:  # both activator replicas scraped since the callers
        value = prometheus_value(prometheus_url, query)
        return value if value is not None and value >= CALLERS else None

    wait_for("the activator's requests in Prometheus", counted, timeout=60)
    wakes = prometheus_value(
        prometheus_url, f"sum(modeldeploy_activator_wakeups_total{{{selector}}})"
    )
    assert wakes == 1
    # The dashboard's scale-from-zero panels read those series.
    panels = {
        title: query
        for title, query in dashboard_queries(
            {"$namespace": namespace, "$modeldeployment": "iris", "$__rate_interval": "1m"}
        ).items()
        if title.startswith("Scale from zero")
    }
    assert len(panels) == 5, panels
    for title, query in panels.items():
        assert prometheus_value(prometheus_url, query) is not None, (title, query)

    # Idle for idleAfter: back to zero, behind the activator again, and a gRPC call wakes it.
    wait_for(
        "iris back at zero",
        lambda: at_zero_behind_the_activator(cluster, namespace),
        timeout=240,
    )
    assert "ScaledToZero" in event_reasons(cluster, namespace)
    grpc_since = datetime.datetime.now(datetime.UTC)
    (row,) = grpc_infer(service_address(cluster, namespace, "iris", 8001), namespace, [SETOSA])
    assert max(range(3), key=lambda c: row[c]) == 0
    assert scale_patches(cluster, namespace, grpc_since).count(200) == 1


def event_reasons(cluster: Cluster, namespace: str) -> set[str]:
    return {
        e["reason"]
        for e in cluster.kubectl_json("get", "events", "-n", namespace)["items"]
        if e["involvedObject"]["name"] == "iris"
    }


def grpc_infer(address: str, namespace: str, rows: list[list[float]]) -> list[list[float]]:
    import numpy as np  # noqa: PLC0415
    import tritonclient.grpc as triton  # noqa: PLC0415

    client = triton.InferenceServerClient(address)
    try:
        tensor = triton.InferInput("features", [len(rows), 4], "FP32")
        tensor.set_data_from_numpy(np.array(rows, dtype=np.float32))
        result = client.infer(
            "iris",
            [tensor],
            headers={"x-modeldeploy-target": f"iris.{namespace}"},
            client_timeout=WAKE_BOUND,
        )
        answer: list[list[float]] = result.as_numpy("probabilities").tolist()
        return answer
    finally:
        client.close()


def test_a_model_that_never_gets_ready_answers_503_with_retry_after_within_the_wake_timeout(
    cluster: Cluster, chart_operator: None, namespace: str, store: Path
) -> None:
    address = asleep(cluster, namespace, sleepy_iris("404", wakeTimeout="20s"))
    answer = post_infer(address, [SETOSA], timeout=60)
    assert answer.status == 503, answer
    assert answer.retry_after is not None
    # Held until the wake timed out, never past it for long: post_infer gives up at 60 s
    # (the deadline itself is tested on a fake clock in tests/unit/test_activator.py).
    assert answer.elapsed >= 20, answer
    assert "did not become ready within 20s" in answer.body["error"], answer.body

    def timed_out() -> dict[str, Any] | None:
        found = condition(get(cluster, namespace, "md", "iris"), "ScaledToZero")
        return found if found is not None and found["reason"] == "WakeTimedOut" else None

    found = wait_for("ScaledToZero WakeTimedOut", timed_out, timeout=60)
    assert "iris/404 does not exist on the claim" in found["message"], found


def test_an_activator_replica_stopped_while_holding_loses_no_caller(
    cluster: Cluster, chart_operator: None, namespace: str, store: Path
) -> None:
    """Every caller gets its answer, or a 503 with Retry-After from the stopping replica that
    a retry turns into an answer (docs/activation.md): none waits forever or sees a reset."""
    address = asleep(cluster, namespace, sleepy_iris(wakeTimeout="5m"))
    results: list[Answer | Exception] = []
    callers = threading.Thread(
        target=lambda: results.extend(concurrently([lambda: post_infer(address, [SETOSA])] * 10))
    )
    callers.start()
    time.sleep(3)  # the callers are held by now (the model takes longer to start)
    victim = sorted(activator_addresses(cluster))[0]
    listed = cluster.kubectl_json(
        "get", "pods", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/component=activator"
    )["items"]
    name = next(p["metadata"]["name"] for p in listed if p["status"].get("podIP") == victim)
    cluster.kubectl("delete", "pod", "-n", OPERATOR_NAMESPACE, name, "--wait=false")
    callers.join(WAKE_BOUND + 60)
    assert len(results) == 10
    retried = 0
    for result in results:
        assert isinstance(result, Answer), result  # no reset, no hang
        if result.status == 503:
            assert result.retry_after is not None, result
            retried += 1
            again = post_infer(address, [SETOSA])
            assert again.status == 200, again
        else:
            assert result.status == 200, result
    print(f"{10 - retried} answered while held, {retried} told to retry and answered then")
