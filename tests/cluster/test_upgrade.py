"""API versions on the real API server: v1beta1 served beside v1alpha1 with no conversion
webhook, objects written as either reconciled, and the storage-version migration that lets
an old version go, checked in etcd itself.

The migration runs on a CRD of our schema under a group of its own: the session's CRD has
stored v1beta1 objects from the first test on, so it cannot be taken back to v1alpha1 only.
(The chart upgrade from the previous release, with its own operator code, is in
test_chart.py.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from localcluster import Cluster
from localcluster.operator import OperatorProcess
from modeldeploy_operator.api import crd
from support import cpu_model, get, wait_for

pytestmark = pytest.mark.cluster

GROUP = "storage-migration.modeldeploy.io"
CRD_NAME = f"modeldeployments.{GROUP}"


def cpu_model_as(api_version: str, name: str) -> dict[str, Any]:
    return {**cpu_model(name), "apiVersion": api_version}


def apply_crd(cluster: Cluster, versions: tuple[str, ...]) -> None:
    text = yaml.safe_dump(crd.build_crd(GROUP, versions))
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=text)
    cluster.wait_established(30)


def stored_as(cluster: Cluster, namespace: str, name: str) -> str:
    """The apiVersion etcd holds the object in: its storage version."""
    value = cluster.etcd_value(f"/registry/{GROUP}/modeldeployments/{namespace}/{name}")
    assert value is not None, name
    found: str = json.loads(value)["apiVersion"]
    return found


def stored_versions(cluster: Cluster) -> list[str]:
    found: list[str] = cluster.kubectl_json("get", "crd", CRD_NAME)["status"]["storedVersions"]
    return found


@pytest.fixture
def migration_crd(cluster: Cluster) -> Iterator[None]:
    yield
    cluster.kubectl("delete", "crd", CRD_NAME, "--wait=true", check=False, timeout=60)


def test_storage_moves_to_v1beta1_and_v1alpha1_can_go(
    cluster: Cluster, namespace: str, migration_crd: None
) -> None:
    old, new = f"{GROUP}/v1alpha1", f"{GROUP}/v1beta1"
    apply_crd(cluster, ("v1alpha1",))  # as the previous release shipped it
    names = [f"m{i}" for i in range(3)]
    for name in names:
        manifest = json.dumps(cpu_model_as(old, name))
        cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=manifest)
    assert {stored_as(cluster, namespace, n) for n in names} == {old}

    # The upgrade: both served, v1beta1 stored. Nothing is rewritten by itself.
    apply_crd(cluster, ("v1alpha1", "v1beta1"))
    assert stored_versions(cluster) == ["v1alpha1", "v1beta1"]
    for version in ("v1alpha1", "v1beta1"):
        listed = cluster.kubectl_json("get", f"modeldeployments.{version}.{GROUP}", "-n", namespace)
        assert [i["apiVersion"] for i in listed["items"]] == [f"{GROUP}/{version}"] * 3
    cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(cpu_model_as(old, "m3")))
    assert stored_as(cluster, namespace, "m3") == new  # written as v1alpha1, stored as v1beta1
    assert stored_as(cluster, namespace, "m0") == old

    # The migration docs/api.md gives: rewrite every object, then drop the old stored version.
    everything = cluster.kubectl("get", f"modeldeployments.{GROUP}", "-A", "-o", "json").stdout
    cluster.kubectl("replace", "-f", "-", stdin=everything)
    assert {stored_as(cluster, namespace, n) for n in [*names, "m3"]} == {new}
    cluster.kubectl(
        "patch",
        "crd",
        CRD_NAME,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"storedVersions": ["v1beta1"]}}',
    )
    # Only now may v1alpha1 leave the CRD; the API server refuses while it is stored.
    apply_crd(cluster, ("v1beta1",))
    assert stored_versions(cluster) == ["v1beta1"]
    listed = cluster.kubectl_json("get", f"modeldeployments.{GROUP}", "-n", namespace)["items"]
    assert sorted(i["metadata"]["name"] for i in listed) == [*names, "m3"]


def test_refused_to_drop_a_version_that_is_still_stored(
    cluster: Cluster, namespace: str, migration_crd: None
) -> None:
    apply_crd(cluster, ("v1alpha1",))
    manifest = json.dumps(cpu_model_as(f"{GROUP}/v1alpha1", "m0"))
    cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=manifest)
    apply_crd(cluster, ("v1alpha1", "v1beta1"))
    text = yaml.safe_dump(crd.build_crd(GROUP, ("v1beta1",)))
    refused = cluster.kubectl("apply", "--server-side", "-f", "-", stdin=text, check=False)
    assert refused.returncode != 0
    assert "storedVersions" in refused.stderr, refused.stderr


def test_a_modeldeployment_written_as_v1beta1_is_reconciled(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """The operator reads v1alpha1; an object created as v1beta1 is the same object."""
    manifest = cpu_model_as("serving.modeldeploy.io/v1beta1", "resnet50")
    cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))
    wait_for(
        "Available",
        lambda: (
            (get(cluster, namespace, "md", "resnet50") or {}).get("status", {}).get("phase")
            == "Available"
        ),
        timeout=60,
    )
    assert get(cluster, namespace, "deployment", "resnet50-stable") is not None
