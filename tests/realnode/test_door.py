"""The prediction API's door on real pods: Triton's ports closed, keys, coarsened outputs,
and a query budget that holds across two replicas (summed by the operator through the real
Prometheus, read by the sidecars from the ConfigMap kubelet keeps in their pods)."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from localcluster import Cluster
from localcluster.dataplane import service_address
from localcluster.realnode import RealNodeSpec
from modeldeploy_runtime.access import client_id
from realnode_support import VERSICOLOR, in_sidecar, pods, sidecar_metrics
from support import condition, get, load_example, merged, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.realnode]

NAME = "iris-protected"
BUDGET = 6


def infer(address: str, key: str) -> tuple[str, Any]:
    """("200", probabilities) or (status, message)."""
    client = httpclient.InferenceServerClient(address, connection_timeout=10, network_timeout=10)
    tensor = httpclient.InferInput("features", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.array([VERSICOLOR], dtype=np.float32))
    try:
        result = client.infer("iris", [tensor], headers={"X-API-Key": key})
    except InferenceServerException as error:
        return str(error.status()), error.message()
    finally:
        client.close()
    return "200", result.as_numpy("probabilities").tolist()[0]


def admitted(cluster: Cluster, namespace: str, pod: str, client: str) -> float:
    """Inference calls of ``client`` the pod's sidecar admitted."""
    text = sidecar_metrics(cluster, namespace, pod)
    return sum(
        float(value)
        for value in re.findall(
            r"^modeldeploy_runtime_client_requests_total\{"
            rf'client="{client}",outcome="admitted"[^}}]*\}} (\S+)',
            text,
            re.MULTILINE,
        )
    )


def listed(cluster: Cluster, namespace: str, pod: str) -> dict[str, float]:
    """The clients over budget as the pod's sidecar sees them (the mounted ConfigMap)."""
    found = in_sidecar(
        cluster,
        namespace,
        pod,
        "import pathlib;p=pathlib.Path('/etc/modeldeploy/query-budgets/exhausted.json');"
        "print(p.read_text() if p.exists() else '{}')",
    )
    exhausted: dict[str, float] = json.loads(found or "{}").get("exhausted", {})
    return exhausted


def test_the_door_on_real_pods_keys_coarsening_and_a_budget_across_replicas(
    cluster: Cluster, chart_operator: None, namespace: str, store: object, real_node: RealNodeSpec
) -> None:
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "iris-keys",
        "-n",
        namespace,
        "--from-literal=clients=alice-key\nbob-key\n",
    )
    manifest = merged(
        load_example("iris-protected.yaml"),
        {"spec": {"monitoring": {"auth": {"queryBudget": {"queries": BUDGET, "window": "1h"}}}}},
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))

    def ready() -> bool:
        found = condition(get(cluster, namespace, "md", NAME), "Ready")
        return found is not None and found["status"] == "True"

    wait_for(f"{NAME} Ready", ready, timeout=300)
    names = [p["metadata"]["name"] for p in pods(cluster, namespace, NAME)]
    assert len(names) == 2
    address = service_address(cluster, namespace, NAME)
    wait_for("the Service answering", lambda: infer(address, "bob-key")[0] == "200", timeout=30)

    # Keys: a stranger is refused; coarsened outputs reach the client rounded.
    assert infer(address, "mallory-key")[0] == "401"
    status, probabilities = infer(address, "bob-key")
    assert status == "200"
    assert all(round(p, 1) == pytest.approx(p, abs=1e-6) for p in probabilities), probabilities
    assert max(range(3), key=lambda i: probabilities[i]) == 1

    # Alice spends her budget across both replicas.
    answers = [infer(address, "alice-key")[0] for _ in range(BUDGET)]
    assert answers.count("200") == BUDGET, answers
    md = get(cluster, namespace, "md", NAME)
    assert md is not None
    uid = md["metadata"]["uid"]
    alice = client_id("alice-key", uid.encode())
    per_pod = {pod: admitted(cluster, namespace, pod, alice) for pod in names}
    assert sum(per_pod.values()) == BUDGET, per_pod
    configmap = wait_for(
        "the operator to list alice as over budget",
        lambda: (
            cm
            if json.loads(
                (
                    cm := cluster.kubectl_json(
                        "get", "configmap", "-n", namespace, f"{NAME}-query-budgets"
                    )
                )["data"]["exhausted.json"]
            )["exhausted"]
            else None
        ),
        timeout=120,
    )
    exhausted = json.loads(configmap["data"]["exhausted.json"])["exhausted"]
    assert exhausted == {alice: BUDGET}, exhausted
    wait_for(
        "kubelet to deliver the list to both pods",
        lambda: all(listed(cluster, namespace, pod) == exhausted for pod in names),
        timeout=180,
    )
    # Refused by whichever pod answers; when both saw part of the budget (all but 2 in 64
    # runs), only the operator's sum can have told them.
    status, message = infer(address, "alice-key")
    assert status == "429", message
    assert "query budget exhausted" in message
    assert f"{BUDGET} queries per 1h" in message
    assert infer(address, "bob-key")[0] == "200"  # another key, another budget
