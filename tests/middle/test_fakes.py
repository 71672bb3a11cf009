"""The middle tier is only as good as its fakes: what they promise to do like the API server
and the Deployment controller, checked."""

from __future__ import annotations

import pytest

from middle.fakes import DeploymentController, FakeKubeApi, Json, is_ready, matches
from modeldeploy_operator.k8s.client import ApiError

MD = "serving.modeldeploy.io/v1alpha1"


def deployment(replicas: int, image: str, surge: int = 1, unavailable: int = 0) -> Json:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": "ns", "labels": {"app": "d"}},
        "spec": {
            "replicas": replicas,
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable},
            },
            "template": {
                "metadata": {"labels": {"app": "d"}},
                "spec": {"containers": [{"name": "c", "image": image}]},
            },
        },
    }


def test_resource_version_moves_on_every_write_and_generation_with_the_spec() -> None:
    api = FakeKubeApi()
    created = api.apply(deployment(2, "a"))
    assert created["metadata"]["generation"] == 1
    scaled = api.merge_patch("apps/v1", "Deployment/scale", "ns", "d", {"spec": {"replicas": 3}})
    assert scaled["kind"] == "Scale"
    annotated = api.merge_patch(
        "apps/v1", "Deployment", "ns", "d", {"metadata": {"annotations": {"a": "b"}}}
    )
    assert annotated["metadata"]["generation"] == 2  # the scale changed the spec, not this
    assert annotated["spec"]["replicas"] == 3
    versions = [created, scaled, annotated]
    assert len({v["metadata"]["resourceVersion"] for v in versions}) == 3


def test_apply_merges_and_drops_what_the_manager_no_longer_applies() -> None:
    api = FakeKubeApi()
    first = deployment(2, "a")
    first["metadata"]["labels"]["old"] = "x"
    api.apply(first)
    api.edit("apps/v1", "Deployment", "ns", "d", {"metadata": {"labels": {"theirs": "y"}}})
    applied = api.apply(deployment(2, "b"))
    assert applied["metadata"]["labels"] == {"app": "d", "theirs": "y"}
    assert applied["spec"]["template"]["spec"]["containers"][0]["image"] == "b"
    assert applied["metadata"]["generation"] == 2


def test_status_and_merge_patches_honour_the_resource_version_precondition() -> None:
    api = FakeKubeApi()
    meta = {"name": "m", "namespace": "default"}
    md = api.create({"apiVersion": MD, "kind": "ModelDeployment", "metadata": meta})
    version = md["metadata"]["resourceVersion"]
    written = api.patch_status("default", "m", {"phase": "Pending"}, version)
    with pytest.raises(ApiError) as conflict:
        api.patch_status("default", "m", {"phase": "Available"}, version)
    assert conflict.value.status == 409
    with pytest.raises(ApiError):
        api.merge_patch(
            MD, "ModelDeployment", "default", "m", {"metadata": {"resourceVersion": version}}
        )
    patch = {"metadata": {"resourceVersion": written["metadata"]["resourceVersion"]}}
    api.merge_patch(MD, "ModelDeployment", "default", "m", patch)
    stored = api.peek(MD, "ModelDeployment", "default", "m")
    assert stored is not None
    assert stored["status"] == {"phase": "Pending"}
    assert stored["metadata"]["generation"] == 1


def test_faults_and_hooks_fire_once_on_the_matching_call() -> None:
    api = FakeKubeApi()
    api.fail_next("get", "Deployment", 0)
    api.fail_next("delete", None, 500, match=lambda call: call.name == "x")
    seen: list[str] = []
    api.before_next("list", "Pod", lambda: seen.append("hook"))
    assert api.get("v1", "Service", "ns", "s") is None
    with pytest.raises(ApiError) as timeout:
        api.get("apps/v1", "Deployment", "ns", "d")
    assert timeout.value.status == 0
    assert api.get("apps/v1", "Deployment", "ns", "d") is None
    api.delete("v1", "Pod", "ns", "y")
    with pytest.raises(ApiError):
        api.delete("v1", "Pod", "ns", "x")
    api.list("v1", "Pod", "ns")
    api.list("v1", "Pod", "ns")
    assert seen == ["hook"]
    assert api.pending_faults == 0


@pytest.mark.parametrize(
    ("selector", "expected"),
    [("a=1", True), ("a=2", False), ("a!=1", False), ("a,b=2", True), ("!a", False), ("c", False)],
)
def test_label_selectors(selector: str, expected: bool) -> None:
    assert matches({"a": "1", "b": "2"}, selector) is expected


@pytest.mark.parametrize(("surge", "unavailable"), [(1, 0), (0, 1), (2, 0)])
def test_the_simulated_controller_rolls_within_surge_and_unavailability(
    surge: int, unavailable: int
) -> None:
    api = FakeKubeApi()
    controller = DeploymentController(api, ready_after=lambda pod: 3)
    api.apply(deployment(3, "a", surge, unavailable))
    for _ in range(10):
        controller.step()
    assert len(controller.pods_of("ns", "d")) == 3
    api.apply(deployment(3, "b", surge, unavailable))
    images: set[str] = set()
    for _ in range(30):
        controller.step()
        pods = controller.pods_of("ns", "d")
        assert len(pods) <= 3 + surge
        assert sum(is_ready(p) for p in pods) >= 3 - unavailable
        images = {p["spec"]["containers"][0]["image"] for p in pods}
    assert images == {"b"}
    status = (api.peek("apps/v1", "Deployment", "ns", "d") or {})["status"]
    assert status["observedGeneration"] == 2
    assert (status["replicas"], status["readyReplicas"], status["updatedReplicas"]) == (3, 3, 3)
    api.delete("apps/v1", "Deployment", "ns", "d")
    controller.step()
    assert api.items("Pod") == []  # garbage-collected
