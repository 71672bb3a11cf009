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
    "spec": {
        "containers": [{"name": "triton", "image": "big"}],
        "nodeName": "n",
        "readinessGates": [{"conditionType": "serving.modeldeploy.io/serving"}],
    },
    "status": {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
        "podIP": "10.0.0.1",
        "hostIP": "172.30.0.1",
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


def test_a_pod_keeps_its_node_gates_address_and_status_fields_only() -> None:
    kept = expand(project(body(POD), "Pod"))
    # The node cache's labels need the node; shadow steps the gates and the address.
    assert kept["spec"] == {"nodeName": "n", "readinessGates": POD["spec"]["readinessGates"]}
    assert kept["status"] == {
        "phase": "Running",
        "conditions": POD["status"]["conditions"],
        "podIP": "10.0.0.1",
    }


def test_a_modeldeployment_keeps_its_annotations_and_its_status() -> None:
    md: dict[str, Any] = {
        "apiVersion": "serving.modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "iris", "namespace": "ns", "annotations": {"a": "b"}},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 1, "canary": {"step": 0}},
    }
    kept = expand(project(body(md), "ModelDeployment"))
    assert kept["metadata"]["annotations"] == {"a": "b"}
    assert kept["status"] == md["status"]  # a pass decides from it: the rollout's state


def test_the_status_of_what_others_drive_is_not_kept() -> None:
    hpa: dict[str, Any] = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "iris", "namespace": "ns", "resourceVersion": "3"},
        "spec": {"maxReplicas": 3},
        "status": {"currentReplicas": 2, "currentMetrics": []},
    }
    kept = expand(project(body(hpa), "HorizontalPodAutoscaler"))
    assert kept["spec"] == hpa["spec"]
    assert "status" not in kept  # the HPA controller's every update would cost a pass


OWNED = {"serving.modeldeploy.io/modeldeployment": "iris"}
LABEL = "serving.modeldeploy.io/modeldeployment"


def pod(name: str, version: str, ready: str = "True", owner: str = "iris") -> dict[str, Any]:
    return {
        **POD,
        "metadata": {
            "name": name,
            "namespace": "ns",
            "resourceVersion": version,
            "labels": {LABEL: owner},
        },
        "status": {**POD["status"], "conditions": [{"type": "Ready", "status": ready}]},
    }


def test_reads_are_copies_a_pass_may_change() -> None:
    cache = ClusterCache()
    for kind in ("Deployment", "Service", "Pod"):
        cache.store(kind, LABEL, lambda _: None).replace([])
    assert cache.ready
    deployment = {**DEPLOYMENT, "metadata": {**DEPLOYMENT["metadata"], "labels": OWNED}}
    cache.store("Deployment", LABEL, lambda _: None).event("ADDED", deployment)
    first = cache.children("ns", "iris")["Deployment/iris-stable"]
    first["spec"]["replicas"] = 99
    again = cache.children("ns", "iris")["Deployment/iris-stable"]
    assert again["spec"]["replicas"] == 2


def test_not_ready_until_every_child_kind_has_listed_once() -> None:
    cache = ClusterCache()
    assert not cache.ready  # no store yet: nothing known
    stores = [cache.store(kind, LABEL, lambda _: None) for kind in ("Deployment", "Pod")]
    stores[0].replace([])
    assert not cache.ready
    assert not cache.wait_ready(0.01)
    stores[1].replace([])
    assert cache.wait_ready(0.01)


def test_a_store_calls_the_owner_only_when_what_is_read_changed() -> None:
    changed: list[tuple[str, str]] = []
    store = ClusterCache().store("Pod", LABEL, changed.append)
    store.replace([pod("a", "1"), pod("b", "1", owner="other")])
    assert sorted(changed) == [("ns", "iris"), ("ns", "other")]  # first sight: every owner
    changed.clear()
    store.event("MODIFIED", pod("a", "2"))  # only the resourceVersion moved
    assert changed == []
    store.event("MODIFIED", pod("a", "3", ready="False"))
    assert changed == [("ns", "iris")]
    assert [p["metadata"]["resourceVersion"] for p in store.owned(("ns", "iris"))] == ["3"]
    changed.clear()
    store.event("DELETED", pod("a", "4", ready="False"))
    assert changed == [("ns", "iris")]
    assert store.owned(("ns", "iris")) == []
    changed.clear()
    store.event("DELETED", pod("gone", "5"))  # never seen: nobody to tell
    assert changed == []


def test_a_relist_tells_the_owners_of_what_changed_or_went_while_unwatched() -> None:
    changed: list[tuple[str, str]] = []
    store = ClusterCache().store("Pod", LABEL, changed.append)
    store.replace([pod("a", "1"), pod("b", "1", owner="b"), pod("c", "1", owner="c")])
    changed.clear()
    # After a 410: "a" unchanged but for its version, "b" deleted, "c" became unready.
    store.replace([pod("a", "7"), pod("c", "8", ready="False", owner="c")])
    assert sorted(changed) == [("ns", "b"), ("ns", "c")]
    assert store.owned(("ns", "b")) == []
    assert len(store) == 2


def test_a_relabelled_object_moves_to_its_new_owner() -> None:
    changed: list[tuple[str, str]] = []
    store = ClusterCache().store("Pod", LABEL, changed.append)
    store.event("ADDED", pod("a", "1"))
    store.event("MODIFIED", pod("a", "2", owner="other"))
    assert set(changed) == {("ns", "iris"), ("ns", "other")}
    assert store.owned(("ns", "iris")) == []
    assert len(store.owned(("ns", "other"))) == 1
    unlabelled = {**pod("a", "3"), "metadata": {"name": "a", "namespace": "ns"}}
    store.event("MODIFIED", unlabelled)  # no owner: no longer held
    assert len(store) == 0


def test_modeldeployments_are_put_and_dropped() -> None:
    cache = ClusterCache()
    md = {"apiVersion": "v", "metadata": {"name": "iris", "namespace": "ns", "uid": "u"}}
    cache.put(md)
    assert cache.keys() == [("ns", "iris")]
    assert (cache.modeldeployment("ns", "iris") or {})["metadata"]["uid"] == "u"
    cache.drop("ns", "iris")
    assert cache.modeldeployment("ns", "iris") is None
    assert cache.sizes() == {"ModelDeployment": 0}


def test_two_events_that_differ_only_in_resource_version_project_alike() -> None:
    before = project(body(POD), "Pod")
    bumped = {**POD, "metadata": {**POD["metadata"], "resourceVersion": "10"}}
    after = project(body(bumped), "Pod")
    assert before[0] != after[0]
    assert before[1] == after[1]
    host = {**POD, "status": {**POD["status"], "hostIP": "10.0.0.2"}}  # not read: not projected
    assert project(body(host), "Pod")[1] == before[1]
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
