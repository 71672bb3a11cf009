"""The watch cache's projection and reads, on kopf's own body views."""

from __future__ import annotations

import json
from typing import Any

import kopf

from modeldeploy_operator.cache import ClusterCache, project

DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {
        "name": "iris-stable",
        "namespace": "ns",
        "resourceVersion": "7",
        "labels": {"serving.modeldeploy.io/modeldeployment": "iris"},
        "annotations": {"deployment.kubernetes.io/revision": "1"},
        "managedFields": [{"manager": "modeldeploy", "fieldsV1": {"f:spec": {}}}],
    },
    "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "triton"}]}}},
    "status": {"readyReplicas": 2},
}
POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "iris-stable-x", "namespace": "ns", "resourceVersion": "9"},
    "spec": {"containers": [{"name": "triton", "image": "big"}], "nodeName": "n"},
    "status": {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
        "podIP": "10.0.0.1",
    },
}


def body(raw: dict[str, Any]) -> kopf.Body:
    """What kopf hands the index functions: read-only views over the watched object."""
    return kopf.Body(raw)  # type: ignore[arg-type]


def test_a_child_keeps_what_the_operator_reads_and_nothing_else() -> None:
    kept = json.loads(project(body(DEPLOYMENT), "Deployment"))
    assert "managedFields" not in kept["metadata"]
    assert "annotations" not in kept["metadata"]
    assert kept["spec"] == DEPLOYMENT["spec"]
    assert kept["status"] == DEPLOYMENT["status"]
    assert kept["metadata"]["resourceVersion"] == "7"


def test_a_pod_keeps_its_status_fields_only() -> None:
    kept = json.loads(project(body(POD), "Pod"))
    assert "spec" not in kept
    assert kept["status"] == {"phase": "Running", "conditions": POD["status"]["conditions"]}


def test_a_modeldeployment_keeps_its_annotations() -> None:
    md = {
        "apiVersion": "serving.modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "iris", "namespace": "ns", "annotations": {"a": "b"}},
        "spec": {"replicas": 1},
    }
    assert json.loads(project(body(md), "ModelDeployment"))["metadata"]["annotations"] == {"a": "b"}


def test_reads_are_copies_a_pass_may_change() -> None:
    cache = ClusterCache()
    stored = project(body(DEPLOYMENT), "Deployment")
    cache.attach({"deployments": {("ns", "iris"): [stored]}, "services": {}, "pods": {}})
    cache.mark_ready()
    first = cache.children("ns", "iris")["Deployment/iris-stable"]
    first["spec"]["replicas"] = 99
    again = cache.children("ns", "iris")["Deployment/iris-stable"]
    assert again["spec"]["replicas"] == 2
