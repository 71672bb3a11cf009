"""Bug 9: an object whose status a newer operator wrote (fields this version does not know)
is still parsed and reconciled, and our status writes leave those fields alone."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
from pydantic import ValidationError

from modeldeploy_operator.act import dump, merge_diff
from modeldeploy_operator.api.v1alpha1 import ModelDeployment
from modeldeploy_operator.builders.deployment import BuildConfig
from modeldeploy_operator.context import OperatorContext
from modeldeploy_operator.reconcile import parse
from support import load_example

NEWER_STATUS: dict[str, Any] = {
    "observedGeneration": 3,
    "phase": "Progressing",
    "somethingNew": {"answer": 42},  # a whole new status section
    "stable": {"version": "1", "revision": "r1", "warmPool": 2},  # a new field in a section
    "canary": {"version": "2", "revision": "r2", "weight": 10, "step": 0, "shadow": True},
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "ReplicasAvailable",
            "message": "2/2 replicas available",
            "severity": "Info",  # as some condition conventions add
        }
    ],
    "autoscaling": {"engine": "builtin", "desiredReplicas": 2, "forecast": [3, 4]},
}


def body() -> dict[str, Any]:
    doc = load_example("minimal.yaml")
    doc["metadata"] |= {"namespace": "ns", "generation": 3, "resourceVersion": "7"}
    doc["status"] = copy.deepcopy(NEWER_STATUS)
    return doc


def context() -> OperatorContext:
    return OperatorContext(
        api=None,  # type: ignore[arg-type]  # parse only logs
        build=BuildConfig(runtime_image="x"),
        telemetry=None,  # type: ignore[arg-type]
        gpus=None,  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
    )


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies a status patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def test_a_status_with_unknown_fields_parses() -> None:
    md = parse(body(), "ns/resnet50", context())
    assert md is not None, "reconcile would have skipped the object"
    assert md.status.phase == "Progressing"
    assert md.status.canary is not None
    assert md.status.canary.weight == 10
    assert md.status.conditions[0].reason == "ReplicasAvailable"
    assert md.status.autoscaling is not None
    assert md.status.autoscaling.desired_replicas == 2


def test_the_spec_stays_strict() -> None:
    doc = body()
    doc["spec"]["replica"] = 2
    with pytest.raises(ValidationError, match="replica"):
        ModelDeployment.model_validate(doc)


def test_a_status_write_leaves_the_unknown_fields_alone() -> None:
    md = ModelDeployment.model_validate(body())
    assert md.status.canary is not None
    new = md.status.model_copy(
        update={
            "phase": "Available",
            "canary": md.status.canary.model_copy(update={"weight": 50}),
            "autoscaling": None,  # autoscaling switched off: our section goes, whole
        }
    )
    patch = merge_diff(dump(md.status), dump(new))
    stored = merge_patch(copy.deepcopy(NEWER_STATUS), patch)
    assert stored["phase"] == "Available"
    assert stored["somethingNew"] == {"answer": 42}
    assert stored["stable"]["warmPool"] == 2
    assert stored["canary"] == {**NEWER_STATUS["canary"], "weight": 50}
    assert "autoscaling" not in stored
    assert "somethingNew" not in patch  # never named, so never nulled


def test_a_status_that_did_not_change_is_not_written() -> None:
    """reconcile writes only when dump(old) != dump(new): unknown fields must not make every
    pass look like a change."""
    md = ModelDeployment.model_validate(body())
    assert dump(md.status) == dump(md.status.model_copy())
    assert "somethingNew" not in dump(md.status)


def test_a_field_cleared_inside_a_track_is_removed_on_the_server() -> None:
    """A merge patch removes only what it names null: a cleared ``canary.readySince`` must be
    named, or it stays on the server and every later pass writes the status again."""
    md = ModelDeployment.model_validate(body())
    assert md.status.canary is not None
    was = md.status.model_copy(
        update={"canary": md.status.canary.model_copy(update={"ready_since": 12.5})}
    )
    now = md.status.model_copy(
        update={"canary": md.status.canary.model_copy(update={"ready_since": None, "step": 2})}
    )
    patch = merge_diff(dump(was), dump(now))
    assert patch == {"canary": {"readySince": None, "step": 2}}  # only what changed
    stored = merge_patch(dump(was), patch)
    assert stored == dump(now)
