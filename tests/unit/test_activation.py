"""Scale from zero, the operator's part: the activator's slice and the ScaledToZero condition
(pure; the real routing is proven in tests/realnode/test_activator.py)."""

from __future__ import annotations

from typing import Any

from modeldeploy_operator.api.v1alpha1 import ModelDeployment
from modeldeploy_operator.autoscaling.activation import plan_activation
from modeldeploy_operator.builders.activation import (
    CONTROLLER_SLICE_MANAGER,
    Activator,
    build_activator_slice,
)
from modeldeploy_operator.status import (
    ActivationView,
    Observed,
    compute_status,
    transition_events,
    wake_seconds,
)
from support import load_example, merged

ACTIVATOR = Activator(("10.244.0.7", "10.244.0.8"), (("grpc", 8081), ("http", 8080)))
SLICE = "EndpointSlice/iris-activator"
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
ZERO = {"enabled": True, "idleAfter": "10m", "wakeTimeout": "5m"}


def md(replicas: int, status: dict[str, Any] | None = None, zero: bool = True) -> ModelDeployment:
    doc = merged(
        load_example("minimal.yaml"),
        {
            "metadata": {"name": "iris", "namespace": "ns", "generation": 3},
            "spec": {
                "replicas": replicas,
                "autoscaling": {
                    "minReplicas": 2,
                    "maxReplicas": 4,
                    "metrics": [{"type": "InFlightPerReplica", "target": 4}],
                    "scaleToZero": ZERO if zero else {"enabled": False},
                },
            },
        },
    )
    if status is not None:
        doc["status"] = status
    return ModelDeployment.model_validate(doc)


def pod(ip: str, ready: bool = True, terminating: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"iris-{ip}"}
    if terminating:
        meta["deletionTimestamp"] = "2026-12-04T00:00:00Z"
    return {
        "metadata": meta,
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def controller_slice(*ready: bool) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "iris-x7f2k",
            "labels": {"endpointslice.kubernetes.io/managed-by": CONTROLLER_SLICE_MANAGER},
        },
        "endpoints": [
            {"addresses": [f"10.244.1.{i}"], "conditions": {"ready": r}}
            for i, r in enumerate(ready)
        ],
    }


def children(
    ours: bool, *controller: dict[str, Any], created: str = "2027-01-15T07:59:00Z"
) -> dict[str, Any]:
    """The Service, the activator's slice (``ours``, created a minute before NOW by
    default) and the controller's slices."""
    piece = build_activator_slice(md(0), ACTIVATOR)
    piece["metadata"]["creationTimestamp"] = created
    found: dict[str, Any] = {
        "Service/iris": {"spec": {"clusterIP": "10.96.0.42"}},
        SLICE: piece if ours else None,
    }
    for piece in controller:
        found[f"EndpointSlice/{piece['metadata']['name']}"] = piece
    return found


def test_going_to_zero_routes_to_the_activator_before_the_last_pod_goes() -> None:
    plan = plan_activation(md(0), children(False), [pod("10.244.1.5")], ACTIVATOR, 1, NOW)
    assert plan.apply is not None
    assert plan.hold_replicas == 1
    assert plan.apply["metadata"]["labels"]["kubernetes.io/service-name"] == "iris"
    assert plan.apply["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] != (
        CONTROLLER_SLICE_MANAGER
    )
    assert [e["addresses"] for e in plan.apply["endpoints"]] == [["10.244.0.7"], ["10.244.0.8"]]
    assert {(p["name"], p["port"]) for p in plan.apply["ports"]} == {("http", 8080), ("grpc", 8081)}
    # The slice seen, but younger than kube-proxy may take to program it: still held.
    young = children(True, created="2027-01-15T07:59:59Z")
    settling = plan_activation(md(0), young, [pod("10.244.1.5")], ACTIVATOR, 1, NOW)
    assert settling.hold_replicas == 1
    assert settling.requeue_after == 2.0
    # Older, the Deployment may go to 0.
    seen = plan_activation(md(0), children(True), [pod("10.244.1.5")], ACTIVATOR, 1, NOW)
    assert seen.apply is not None
    assert seen.hold_replicas is None


def test_woken_the_slice_stays_until_the_controller_lists_a_ready_pod() -> None:
    waking = plan_activation(md(2), children(True, controller_slice(False)), [], ACTIVATOR, 2, NOW)
    assert waking.apply is not None
    assert not waking.delete
    served = children(True, controller_slice(False, True))
    awake = plan_activation(md(2), served, [pod("10.244.1.1")], ACTIVATOR, 2, NOW)
    assert awake.apply is None
    assert awake.delete
    assert awake.status is not None
    assert awake.status.addresses == ["10.244.1.1"]
    # Up from the start (never at zero): no slice at all.
    fresh = plan_activation(md(2), children(False), [], ACTIVATOR, 2, NOW)
    assert fresh.apply is None
    assert not fresh.delete


def test_without_a_ready_activator_nothing_is_routed_and_nothing_taken_away() -> None:
    """(At zero: an empty slice would not be better than a stale one.)"""
    for activator in (None, Activator((), (("http", 8080),))):
        # Pods serving again, the stale slice goes all the same.
        served = children(True, controller_slice(True))
        assert plan_activation(md(2), served, [], activator, 2, NOW).delete
        plan = plan_activation(md(0), children(True), [], activator, 1, NOW)
        assert plan.apply is None
        assert not plan.delete
        assert plan.hold_replicas is None
        assert not plan.configured


def test_scale_to_zero_turned_off_removes_the_slice() -> None:
    plan = plan_activation(md(2, zero=False), children(True), [], ACTIVATOR, 2, NOW)
    assert plan.delete
    assert plan.apply is None
    assert plan.status is None


def test_status_lists_ready_pods_only_and_the_service_address() -> None:
    pods = [
        pod("10.244.1.9"),
        pod("10.244.1.2"),
        pod("10.244.1.3", ready=False),
        pod("10.244.1.4", terminating=True),
    ]
    plan = plan_activation(md(2), children(False), pods, ACTIVATOR, 2, NOW)
    assert plan.status is not None
    assert plan.status.addresses == ["10.244.1.2", "10.244.1.9"]
    assert plan.status.service_ip == "10.96.0.42"


def deployment(ready: int) -> dict[str, Any]:
    return {
        "metadata": {"generation": 1},
        "spec": {"replicas": 2},
        "status": {
            "observedGeneration": 1,
            "replicas": 2,
            "readyReplicas": ready,
            "updatedReplicas": 2,
            "availableReplicas": ready,
        },
    }


def zero_condition(status: Any) -> tuple[str, str, str]:
    found = next(c for c in status.conditions if c.type == "ScaledToZero")
    return found.status, found.reason, found.message


def test_the_condition_follows_a_wake_from_zero_to_ready_and_says_how_long_it_took() -> None:
    view = ActivationView(configured=True)
    at_zero = compute_status(md(0), Observed(activation=view), "rev", "2026-12-04T10:00:00Z")
    assert zero_condition(at_zero)[:2] == ("True", "ScaledToZero")
    assert "the activator holds the next request" in zero_condition(at_zero)[2]
    dump = at_zero.model_dump(by_alias=True, exclude_none=True)

    woken = md(2, dump)
    waking = compute_status(
        woken, Observed(deployment=deployment(0), activation=view), "rev", "2026-12-04T10:01:00Z"
    )
    assert zero_condition(waking)[:2] == ("False", "Waking")
    assert [e.reason for e in transition_events(at_zero, waking)] == ["Waking"]

    still = md(2, waking.model_dump(by_alias=True, exclude_none=True))
    ready = compute_status(
        still, Observed(deployment=deployment(1), activation=view), "rev", "2026-12-04T10:01:42Z"
    )
    assert zero_condition(ready)[1] == "Awake"
    assert "42.0s after the scale-up from zero" in zero_condition(ready)[2]
    assert "Awake" in [e.reason for e in transition_events(waking, ready)]
    assert wake_seconds(waking, ready, "2026-12-04T10:01:42Z") == 42.0


def test_a_wake_past_its_timeout_says_why_the_pods_are_not_ready() -> None:
    view = ActivationView(configured=True)
    at_zero = compute_status(md(0), Observed(activation=view), "rev", "2026-12-04T10:00:00Z")
    woken = md(2, at_zero.model_dump(by_alias=True, exclude_none=True))
    waking = compute_status(
        woken, Observed(deployment=deployment(0), activation=view), "rev", "2026-12-04T10:00:05Z"
    )
    later = md(2, waking.model_dump(by_alias=True, exclude_none=True))
    broken = {
        "metadata": {"name": "iris-abc"},
        "status": {
            "initContainerStatuses": [
                {
                    "name": "fetch-model",
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 3, "message": "no such model"}},
                }
            ]
        },
    }
    timed_out = compute_status(
        later,
        Observed(deployment=deployment(0), pods=[broken], activation=view),
        "rev",
        "2026-12-04T10:05:06Z",
    )
    status, reason, message = zero_condition(timed_out)
    assert (status, reason) == ("False", "WakeTimedOut")
    assert "no such model" in message
    assert "503" in message
    events = transition_events(waking, timed_out)
    assert ("Warning", "WakeTimedOut") in [(e.type, e.reason) for e in events]


def test_at_zero_without_an_activator_the_condition_says_nothing_wakes_it() -> None:
    status = compute_status(md(0), Observed(), "rev", "2026-12-04T10:00:00Z")
    assert "no activator is installed" in zero_condition(status)[2]
    off = compute_status(md(2, zero=False), Observed(), "rev", "2026-12-04T10:00:00Z")
    assert not [c for c in off.conditions if c.type == "ScaledToZero"]


def test_going_to_sleep_is_a_normal_event_not_a_warning() -> None:
    view = ActivationView(configured=True)
    awake = compute_status(
        md(2), Observed(deployment=deployment(2), activation=view), "rev", "2026-12-04T10:00:00Z"
    )
    asleep = compute_status(
        md(0, awake.model_dump(by_alias=True, exclude_none=True)),
        Observed(activation=view),
        "rev",
        "2026-12-04T10:20:00Z",
    )
    events = [(e.type, e.reason) for e in transition_events(awake, asleep)]
    assert ("Normal", "ScaledToZero") in events
    assert not [e for e in events if e[0] == "Warning"], events
