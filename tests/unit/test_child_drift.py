"""Does a child still match what the operator wants (``modeldeploy_operator.drift``)?"""

from __future__ import annotations

import copy
from typing import Any

from modeldeploy_operator.drift import contains, needs_apply, others_in_template

DESIRED: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "m-stable", "labels": {"app": "m"}},
    "spec": {
        "template": {
            "spec": {
                "securityContext": {"runAsNonRoot": True},
                "containers": [
                    {
                        "name": "triton",
                        "args": ["--model-repository=/models"],
                        "env": [{"name": "A", "value": "1"}],
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            }
        }
    },
}


def observed() -> dict[str, Any]:
    """DESIRED as the API server returns it: defaults filled in, other managers' fields."""
    found = copy.deepcopy(DESIRED)
    found["metadata"]["resourceVersion"] = "5"
    found["status"] = {"readyReplicas": 1}
    pod = found["spec"]["template"]["spec"]
    pod["dnsPolicy"] = "ClusterFirst"
    pod["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    return found


def edited(path: str, value: Any) -> dict[str, Any]:
    found = observed()
    target: Any = found["spec"]["template"]["spec"]
    *parents, last = path.split("/")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[last] = value
    return found


def test_defaults_and_status_are_no_drift() -> None:
    assert not needs_apply(observed(), DESIRED)
    assert contains({"a": 1, "b": 2}, {"a": 1})


def test_changed_values_removed_fields_and_added_list_entries_are_drift() -> None:
    assert needs_apply(edited("containers/0/args", ["--model-repository=/x"]), DESIRED)
    assert needs_apply(edited("containers/0/env", [{"name": "A", "value": "2"}]), DESIRED)
    more_env = [{"name": "A", "value": "1"}, {"name": "B", "value": "x"}]
    assert needs_apply(edited("containers/0/env", more_env), DESIRED)
    assert needs_apply(None, DESIRED)


def test_a_key_added_inside_a_security_context_is_drift() -> None:
    ours = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    privileged = {**ours, "privileged": True}
    assert needs_apply(edited("containers/0/securityContext", privileged), DESIRED)
    added = {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert needs_apply(edited("containers/0/securityContext/capabilities", added), DESIRED)
    sysctls = [{"name": "net.core.somaxconn", "value": "1024"}]
    pod_context = {"runAsNonRoot": True, "sysctls": sysctls}
    assert needs_apply(edited("securityContext", pod_context), DESIRED)


def test_the_managers_that_own_pod_template_fields_besides_ours() -> None:
    found = observed()
    template: dict[str, Any] = {"f:spec": {"f:template": {"f:spec": {"f:containers": {}}}}}
    found["metadata"]["managedFields"] = [
        {"manager": "modeldeploy", "operation": "Apply", "fieldsV1": template},
        {"manager": "kube-controller-manager", "fieldsV1": {"f:status": {}}},
        {"manager": "kubectl-rollout", "fieldsV1": {"f:spec": {"f:template": {"f:metadata": {}}}}},
    ]
    assert others_in_template(found, "modeldeploy") == []  # a restart's annotation is not it
    found["metadata"]["managedFields"].append({"manager": "kubectl-patch", "fieldsV1": template})
    assert others_in_template(found, "modeldeploy") == ["kubectl-patch"]
