"""When does a child need applying again?"""

from __future__ import annotations

from modeldeploy_operator.api.v1alpha1 import AutoscalingSpec
from modeldeploy_operator.autoscaling import desired_replicas
from modeldeploy_operator.drift import contains, needs_apply

DESIRED = {
    "metadata": {"name": "x", "labels": {"a": "1"}},
    "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "c", "image": "i:1"}]}}},
}


def observed(**spec_changes: object) -> dict[str, object]:
    spec = {
        "replicas": 2,
        "revisionHistoryLimit": 10,  # a server default we never set
        "template": {
            "spec": {
                "containers": [{"name": "c", "image": "i:1", "imagePullPolicy": "IfNotPresent"}]
            }
        },
    } | spec_changes
    return {
        "metadata": {"name": "x", "labels": {"a": "1", "other": "kept"}, "resourceVersion": "7"},
        "spec": spec,
        "status": {"replicas": 2},
    }


def test_server_defaults_and_foreign_fields_are_not_drift() -> None:
    assert not needs_apply(observed(), DESIRED)


def test_missing_object_or_changed_field_is_drift() -> None:
    assert needs_apply(None, DESIRED)
    assert needs_apply(observed(replicas=3), DESIRED)
    assert needs_apply(
        observed(template={"spec": {"containers": [{"name": "c", "image": "evil"}]}}), DESIRED
    )
    assert needs_apply(observed(template={"spec": {"containers": []}}), DESIRED)


def test_contains_semantics() -> None:
    assert contains({"a": 1, "b": 2}, {"a": 1})
    assert not contains({"a": 1}, {"a": 1, "b": 2})
    assert contains([{"a": 1, "x": 0}], [{"a": 1}])
    assert not contains([{"a": 1}, {"a": 2}], [{"a": 1}])
    assert not contains("1", 1)


def test_builtin_autoscaler_keeps_replicas_within_bounds() -> None:
    spec = AutoscalingSpec.model_validate(
        {
            "minReplicas": 2,
            "maxReplicas": 4,
            "metrics": [{"type": "InFlightPerReplica", "target": 4}],
        }
    )
    assert desired_replicas(None, spec) == 2
    assert desired_replicas(1, spec) == 2
    assert desired_replicas(3, spec) == 3
    assert desired_replicas(9, spec) == 4
    hpa = spec.model_copy(update={"engine": "hpa"})
    assert desired_replicas(1, hpa) is None
