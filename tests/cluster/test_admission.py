"""Admission without the operator (reliability case 36): the real API server refuses invalid
ModelDeployments with 422 Unprocessable Entity and a message that names the field, from the
CRD's schema and CEL rules and from the chart's ValidatingAdmissionPolicy. No webhook exists,
so none of it needs the operator: every test here runs with it stopped.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from chart_support import render
from localcluster import Cluster
from localcluster.operator import OperatorProcess
from modeldeploy_operator.api.v1alpha1 import GROUP, PLURAL
from support import cpu_model

pytestmark = pytest.mark.cluster

VERSION = "v1beta1"
PINNED_LABEL = "serving.modeldeploy.io/require-digests"
DIGEST = "sha256:" + "ab" * 32
TRITON = "nvcr.io/nvidia/tritonserver:24.10-py3"


@pytest.fixture
def api(cluster: Cluster, own_operator: list[OperatorProcess]) -> k8s.CustomObjectsApi:
    """The custom objects API, with the operator stopped (``own_operator`` stops the
    session's and starts none)."""
    client = k8s_config.new_client_from_config(str(cluster.state.kubeconfig))  # type: ignore[no-untyped-call]
    return k8s.CustomObjectsApi(client)


def submit(
    api: k8s.CustomObjectsApi, namespace: str, manifest: dict[str, Any], *, update: bool = False
) -> tuple[int, str]:
    """Create (or replace) the object: (HTTP status, the API server's message)."""
    body = {**manifest, "apiVersion": f"{GROUP}/{VERSION}"}
    name = manifest["metadata"]["name"]
    try:
        if update:
            current = cast(
                dict[str, Any],
                api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name),
            )
            version = current["metadata"]["resourceVersion"]
            body["metadata"] = {**body["metadata"], "resourceVersion": version}
            api.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body)
        else:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    except k8s.ApiException as error:
        return int(error.status), str(json.loads(error.body or "{}").get("message", ""))
    return 201 if not update else 200, ""


def with_spec(name: str, **spec: Any) -> dict[str, Any]:
    manifest = cpu_model(name)
    for key, value in spec.items():
        manifest["spec"][key] = {**manifest["spec"].get(key, {}), **value}
    return manifest


def test_the_schema_and_its_rules_refuse_with_422_naming_the_field(
    api: k8s.CustomObjectsApi, namespace: str
) -> None:
    steps = {"strategy": "Canary", "steps": [{"weight": 150}]}
    status, message = submit(api, namespace, with_spec("heavy", rollout=steps))
    assert status == 422, message
    assert "spec.rollout.steps[0].weight" in message, message

    assert submit(api, namespace, with_spec("renamed")) == (201, "")
    renamed = with_spec("renamed", model={"name": "another-model"})
    status, message = submit(api, namespace, renamed, update=True)
    assert status == 422, message
    assert "spec.model.name" in message, message
    assert "immutable" in message, message
    # Everything else of the model may change: a new version is a rollout.
    new_version = with_spec("renamed", model={"version": "2"})
    assert submit(api, namespace, new_version, update=True) == (200, "")


@pytest.fixture
def digest_policy(cluster: Cluster) -> Iterator[None]:
    """The chart's ValidatingAdmissionPolicy and its binding, as ``helm install`` makes them."""
    objects = [d for d in render() if d["kind"].startswith("ValidatingAdmissionPolicy")]
    assert sorted(d["kind"] for d in objects) == [
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    text = yaml.safe_dump_all(objects)
    cluster.kubectl("apply", "-f", "-", stdin=text)
    yield
    cluster.kubectl("delete", "-f", "-", stdin=text, check=False)


def test_in_a_namespace_that_requires_digests_unpinned_models_and_images_are_refused(
    cluster: Cluster, api: k8s.CustomObjectsApi, namespace: str, digest_policy: None
) -> None:
    unpinned = with_spec("unpinned", server={"image": TRITON})
    # The policy binds to labelled namespaces only.
    assert submit(api, namespace, unpinned) == (201, "")
    cluster.kubectl("label", "namespace", namespace, f"{PINNED_LABEL}=true")

    def refused(manifest: dict[str, Any]) -> str:
        manifest = copy.deepcopy(manifest)
        manifest["metadata"]["name"] += "-2"
        # A new policy, and a namespace's new label, take a moment to reach the API server's
        # admission chain (its informers): on a cluster that just started, seconds.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, message = submit(api, namespace, manifest)
            if status == 422:
                return message
            assert status == 201, message
            api.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, manifest["metadata"]["name"]
            )
            time.sleep(0.2)
        raise AssertionError("the policy never refused it in 30 s")

    message = refused(unpinned)
    assert "spec.model.digest" in message, message
    assert "spec.server.image" in message, message
    pinned_image = f"{TRITON}@{DIGEST}"
    message = refused(with_spec("tagged", server={"image": TRITON}, model={"digest": DIGEST}))
    assert "spec.server.image" in message, message
    assert "spec.model" not in message, message
    message = refused(with_spec("loose", server={"image": pinned_image}))
    assert "spec.model.digest" in message, message
    assert "spec.server.image" not in message, message

    pinned = with_spec("pinned", server={"image": pinned_image}, model={"digest": DIGEST})
    assert submit(api, namespace, pinned) == (201, "")
    oci = with_spec(
        "archive",
        server={"image": pinned_image},
        model={"storageUri": f"oci://registry.example.com/models/iris@{DIGEST}"},
    )
    assert submit(api, namespace, oci) == (201, "")
