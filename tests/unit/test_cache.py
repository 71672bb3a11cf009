"""The watch cache's projection and reads, on kopf's own body views."""

from __future__ import annotations

from typing import Any

import kopf

from modeldeploy_operator.cache import ClusterCache, expand, project, trigger_of

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
    kept = expand(project(body(DEPLOYMENT), "Deployment"))
    assert "managedFields" not in kept["metadata"]
    assert "annotations" not in kept["metadata"]
    assert kept["spec"] == DEPLOYMENT["spec"]
    assert kept["status"] == DEPLOYMENT["status"]
    assert kept["metadata"]["resourceVersion"] == "7"


def test_a_pod_keeps_its_status_fields_only() -> None:
    kept = expand(project(body(POD), "Pod"))
    assert "spec" not in kept
    assert kept["status"] == {"phase": "Running", "conditions": POD["status"]["conditions"]}


def test_a_modeldeployment_keeps_its_annotations() -> None:
    md: dict[str, Any] = {
        "apiVersion": "serving.modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "iris", "namespace": "ns", "annotations": {"a": "b"}},
        "spec": {"replicas": 1},
    }
    assert expand(project(body(md), "ModelDeployment"))["metadata"]["annotations"] == {"a": "b"}


def test_reads_are_copies_a_pass_may_change() -> None:
    cache = ClusterCache()
    stored = project(body(DEPLOYMENT), "Deployment")
    cache.attach({"deployments": {("ns", "iris"): [stored]}, "services": {}, "pods": {}})
    cache.mark_ready()
    first = cache.children("ns", "iris")["Deployment/iris-stable"]
    first["spec"]["replicas"] = 99
    again = cache.children("ns", "iris")["Deployment/iris-stable"]
    assert again["spec"]["replicas"] == 2


def test_two_events_that_differ_only_in_resource_version_project_alike() -> None:
    before = project(body(POD), "Pod")
    bumped = {**POD, "metadata": {**POD["metadata"], "resourceVersion": "10"}}
    after = project(body(bumped), "Pod")
    assert before[0] != after[0]
    assert before[1] == after[1]
    ip = {**POD, "status": {**POD["status"], "podIP": "10.0.0.2"}}  # not read: not projected
    assert project(body(ip), "Pod")[1] == before[1]
    unready = {
        **POD,
        "status": {**POD["status"], "conditions": [{"type": "Ready", "status": "False"}]},
    }
    assert project(body(unready), "Pod")[1] != before[1]


def test_an_event_needs_a_pass_only_when_it_changed_what_is_read() -> None:
    cache = ClusterCache()
    cache.note("u1", "a")
    assert cache.relevant("u1", None)  # the listing: always
    cache.note("u1", "a")
    assert not cache.relevant("u1", "MODIFIED")
    cache.note("u1", "b")
    assert cache.relevant("u1", "MODIFIED")
    assert cache.relevant("u1", "DELETED")
    cache.note("u1", "b")  # after a deletion, the same content is a first sight again
    assert cache.relevant("u1", "MODIFIED")


def test_a_modeldeployments_own_status_is_no_trigger() -> None:
    md: dict[str, Any] = {
        "metadata": {"name": "iris", "generation": 1, "annotations": {"x": "y"}},
        "spec": {"replicas": 1},
        "status": {"phase": "Progressing"},
    }
    status_written = {**md, "status": {"phase": "Available"}}
    assert trigger_of(body(md)) == trigger_of(body(status_written))
    new_spec = {**md, "metadata": {**md["metadata"], "generation": 2}}
    assert trigger_of(body(new_spec)) != trigger_of(body(md))
    command = {
        **md,
        "metadata": {**md["metadata"], "annotations": {"serving.modeldeploy.io/command": "abort"}},
    }
    assert trigger_of(body(command)) != trigger_of(body(md))
