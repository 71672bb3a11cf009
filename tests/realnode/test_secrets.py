"""Secrets on real pods (case #39 of docs/reliability.md): the operator has no access to them,
learns that one is missing from the real kubelet's FailedMount Event, and the values reach
only the containers that need them, never an environment or a log."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from localcluster import Cluster
from localcluster.dataplane import OPERATOR_NAMESPACE, RELEASE, operator_pod
from realnode_support import iris, pods, ready
from support import condition, get, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.realnode]

CREDENTIALS_DIR = "/var/run/secrets/modeldeploy/model-credentials"
API_KEYS_DIR = "/var/run/secrets/modeldeploy/api-keys"
# Where a container's own environment and mounts are seen from inside it.
SEEN = (
    "import os,pathlib;"
    "print(pathlib.Path('/proc/1/environ').read_bytes().decode(errors='replace'));"
    f"print('credentials' if os.path.exists('{CREDENTIALS_DIR}') else '');"
    f"print('keys' if os.path.exists('{API_KEYS_DIR}') else '')"
)


def inside(cluster: Cluster, namespace: str, pod: str, container: str) -> str:
    return cluster.kubectl(
        "exec", "-n", namespace, pod, "-c", container, "--", "python3", "-c", SEEN
    ).stdout


def secret_refs(container: dict[str, Any]) -> list[str]:
    """How a container's spec takes anything from a Secret: env, envFrom, mounts."""
    found = [
        f"env {e['name']}"
        for e in container.get("env", [])
        if "secretKeyRef" in (e.get("valueFrom") or {})
    ]
    found += [
        f"envFrom {e['secretRef']['name']}"
        for e in container.get("envFrom", [])
        if "secretRef" in e
    ]
    found += [
        f"mount {m['name']}"
        for m in container.get("volumeMounts", [])
        if m["name"] in ("model-credentials", "api-keys")
    ]
    return found


def test_a_missing_secret_is_named_from_the_kubelet_and_values_stay_where_they_belong(
    cluster: Cluster, chart_operator: None, namespace: str, store: object
) -> None:
    account = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{RELEASE}"
    for verb in ("get", "list", "watch"):
        answer = cluster.kubectl(
            "auth", "can-i", verb, "secrets", "-n", namespace, f"--as={account}", check=False
        )
        assert answer.stdout.strip() == "no", (verb, answer.stdout)

    manifest = json.loads(iris())
    manifest["spec"]["model"]["credentialsSecret"] = "iris-creds"
    manifest["spec"]["monitoring"] = {"auth": {"apiKeySecret": {"name": "iris-keys"}}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))

    def degraded() -> str | None:
        found = condition(get(cluster, namespace, "md", "iris"), "Degraded")
        if found is None or found["reason"] != "SecretNotFound":
            return None
        return str(found["message"])

    message = wait_for("Degraded: SecretNotFound, from the kubelet", degraded, timeout=120)
    assert "spec.model.credentialsSecret" in message or "spec.monitoring.auth" in message

    credential = f"credential-{uuid.uuid4().hex}"
    key = f"key-{uuid.uuid4().hex}"
    cluster.kubectl("create", "secret", "generic", "iris-creds", "-n", namespace,
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={credential}")  # fmt: skip
    cluster.kubectl("create", "secret", "generic", "iris-keys", "-n", namespace,
                    f"--from-literal=clients={key}\n")  # fmt: skip
    # The kubelet mounts them on its next try (its retries back off); then the pod starts.
    wait_for("iris Ready once the Secrets exist", lambda: ready(cluster, namespace), timeout=300)
    found = condition(get(cluster, namespace, "md", "iris"), "Degraded")
    assert found is not None
    assert found["status"] == "False", found

    (pod,) = [p for p in pods(cluster, namespace) if not p["metadata"].get("deletionTimestamp")]
    name = pod["metadata"]["name"]
    spec = pod["spec"]
    (fetcher,) = spec["initContainers"]
    assert secret_refs(fetcher) == ["mount model-credentials"]
    by_name = {c["name"]: c for c in spec["containers"]}
    assert secret_refs(by_name["triton"]) == []
    assert secret_refs(by_name["runtime"]) == ["mount api-keys"]  # the keys it checks

    triton = inside(cluster, namespace, name, "triton")
    runtime = inside(cluster, namespace, name, "runtime")
    for value in (credential, key):
        assert value not in triton
        assert value not in runtime  # the keys are in a file, not the environment
    assert "credentials" not in triton.split()
    assert "credentials" not in runtime.split()
    assert "keys" not in triton.split()

    logs = [
        cluster.kubectl("logs", "-n", namespace, name, "-c", c).stdout
        for c in ("fetch-model", "triton", "runtime")
    ]
    operator = operator_pod(cluster)
    assert operator is not None
    logs.append(
        cluster.kubectl("logs", "-n", OPERATOR_NAMESPACE, operator["metadata"]["name"]).stdout
    )
    for log in logs:
        assert credential not in log
        assert key not in log
