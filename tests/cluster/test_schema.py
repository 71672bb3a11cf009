"""The schema pruning guard (reliability case 27), on the real API server.

A CRD's structural schema prunes every field it does not declare, silently: a status field
the operator writes but the schema forgot would vanish on the server, and the operator would
write it again on every pass, or lose what it records (a rollout's step, its passed checks).
The first test writes a status with every field of ``ModelDeploymentStatus`` set, found by
walking the model itself (so a field added later is covered without touching this test),
and reads it back unchanged. It runs on a CRD of our schema under a group of its own, where
no operator overwrites the status while the test reads it.

The second checks the other half of kopf's pruning trap: the operator keeps no state of
kopf's in the object (no diff-base or progress annotations, no ``status.kopf``), so there is
nothing of kopf's for pruning to lose.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from localcluster import Cluster
from localcluster.operator import OperatorProcess
from modeldeploy_operator.act import dump
from modeldeploy_operator.api import crd
from modeldeploy_operator.api.v1alpha1 import ModelDeploymentStatus
from support import DELETE, get, load_example, merged, wait_for

pytestmark = pytest.mark.cluster

GROUP = "schema-guard.modeldeploy.io"
# Names of its own: with the same kind and short names, kubectl (its discovery cached for
# minutes) could take `kubectl get md` in later tests to mean this group.
NAMES = {"plural": "guards", "singular": "guard", "kind": "Guard", "listKind": "GuardList"}
CRD_NAME = f"guards.{GROUP}"


def sample(annotation: Any, name: str) -> Any:
    """A value of this type, never None: every optional field gets one."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType, typing.Annotated):  # X | None, Annotated[X, ...]
        return sample(next(a for a in get_args(annotation) if a is not type(None)), name)
    if origin is Literal:
        return get_args(annotation)[-1]
    if origin is list:
        return [sample(get_args(annotation)[0], name)]
    if origin is dict:
        return {"key": sample(get_args(annotation)[1], name)}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return every_field(annotation)
    scalars: dict[Any, Any] = {bool: True, int: 7, float: 1.25, str: f"{name}-value"}
    assert annotation in scalars, f"no sample for {name}: {annotation!r}"
    return scalars[annotation]


def every_field(model: type[BaseModel]) -> dict[str, Any]:
    """Every field of the model set, by its Python name (``model_validate`` takes them)."""
    return {name: sample(info.annotation, name) for name, info in model.model_fields.items()}


def leaves(value: Any, path: str = "status") -> set[str]:
    if isinstance(value, dict):
        return {leaf for k, v in value.items() for leaf in leaves(v, f"{path}.{k}")}
    if isinstance(value, list):
        return {leaf for item in value for leaf in leaves(item, f"{path}[]")}
    return {path}


@pytest.fixture
def guard_crd(cluster: Cluster) -> Iterator[None]:
    definition = crd.build_crd(GROUP, crd.VERSIONS)
    definition["metadata"]["name"] = CRD_NAME
    definition["spec"]["names"] = NAMES
    text = yaml.safe_dump(definition)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=text)
    cluster.wait_established(30)
    yield
    cluster.kubectl("delete", "crd", CRD_NAME, "--wait=true", check=False, timeout=60)


def test_every_status_field_survives_a_write_and_a_read(
    cluster: Cluster, namespace: str, guard_crd: None
) -> None:
    status = ModelDeploymentStatus.model_validate(every_field(ModelDeploymentStatus))
    written = dump(status)
    # The walk reached every nested model: 60-odd leaves, each with a value.
    assert len(leaves(written)) > 50, sorted(leaves(written))

    manifest = merged(load_example("minimal.yaml"), {"spec": {"resources": {"gpu": DELETE}}})
    manifest["apiVersion"] = f"{GROUP}/{crd.VERSIONS[-1]}"
    manifest["kind"] = NAMES["kind"]
    manifest["metadata"] = {"name": "guarded"}
    cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))
    resource = CRD_NAME
    cluster.kubectl(
        "patch", resource, "guarded", "-n", namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": written}),
    )  # fmt: skip

    for version in crd.VERSIONS:
        read = cluster.kubectl_json("get", f"guards.{version}.{GROUP}", "guarded",
                                    "-n", namespace)  # fmt: skip
        pruned = leaves(written) - leaves(read["status"])
        assert not pruned, f"the schema prunes {sorted(pruned)}"
        assert read["status"] == written
        # What the operator parses from it is what it wrote.
        assert ModelDeploymentStatus.model_validate(read["status"]) == status


def test_the_operator_keeps_no_state_of_kopfs_in_the_object(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    manifest = merged(load_example("minimal.yaml"), {"spec": {"resources": {"gpu": DELETE}}})
    manifest["metadata"] = {"name": "plain"}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))

    def settled(generation: int) -> dict[str, Any] | None:
        md = get(cluster, namespace, "modeldeployment", "plain")
        observed = (md or {}).get("status", {}).get("observedGeneration")
        return md if observed == generation else None

    wait_for("the first reconcile", lambda: settled(1))
    cluster.kubectl("patch", "modeldeployment", "plain", "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"replicas": 2}}))  # fmt: skip
    wait_for("the change reconciled", lambda: settled(2))
    md = cluster.kubectl_json(
        "get", "modeldeployment", "plain", "-n", namespace, "--show-managed-fields"
    )

    annotations = md["metadata"].get("annotations", {})
    assert not [k for k in annotations if "kopf" in k], annotations
    assert not md["metadata"].get("finalizers"), md["metadata"]
    assert "kopf" not in md["status"], md["status"]
    # kopf writes nothing at all: every write to the object is the operator's own field manager.
    managers = {entry["manager"] for entry in md["metadata"]["managedFields"]}
    assert not [m for m in managers if "kopf" in m.lower()], managers
