"""The autoscaling decisions: the HPA algorithm, GPU capacity and scale to zero, table-tested."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from modeldeploy_operator.api.v1alpha1 import ModelDeployment
from modeldeploy_operator.autoscaling.capacity import replicas_that_fit, tolerates
from modeldeploy_operator.autoscaling.decide import (
    Inputs,
    Policy,
    Reading,
    Recommendation,
    desired_replicas,
    metric_replicas,
    stabilise,
)
from modeldeploy_operator.builders.deployment import BuildConfig
from modeldeploy_operator.context import OperatorContext
from modeldeploy_operator.metrics.prometheus import MetricsProvider
from modeldeploy_operator.plugin import render_status
from modeldeploy_operator.reconcile import autoscale
from modeldeploy_operator.status import Observed, compute_status, transition_events
from support import load_example, merged

POLICY = Policy(min_replicas=1, max_replicas=10, down_window=300.0)


def inflight(value: float | None, target: float = 4) -> Reading:
    return Reading("InFlightPerReplica", value, target, per_replica=True)


def latency(value: float | None, target: float = 0.25) -> Reading:
    return Reading("P99Latency", value, target, per_replica=False)


@pytest.mark.parametrize(
    ("current", "reading", "expected"),
    [
        (2, inflight(16), 4),  # 16 in flight at 4 per replica
        (2, inflight(17), 5),  # rounded up
        (4, inflight(16.00000001), 4),  # float noise is not a replica
        (4, inflight(17), 4),  # 17/16 is within the 10 % tolerance: no change
        (4, inflight(0), 0),  # the caller clamps to minReplicas
        (0, inflight(3), 1),  # per-replica metrics work from zero
        (2, latency(0.5), 4),  # twice the latency budget: twice the replicas
        (2, latency(0.26), 2),  # within tolerance
        (4, latency(0.1), 2),
        (0, latency(0.5), None),  # a ratio of nothing
        (2, inflight(None), None),
    ],
)
def test_one_metric(current: int, reading: Reading, expected: int | None) -> None:
    assert metric_replicas(current, reading, 0.1) == expected


def test_the_largest_proposal_wins() -> None:
    decision = desired_replicas(
        Inputs(now=1000, current=2, readings=[inflight(8), latency(0.75)], since=0), POLICY
    )
    assert decision.replicas == 6  # in-flight asks for 2, latency for 6
    assert decision.reason == "ScaledUp"
    assert [m.replicas for m in decision.metrics] == [2, 6]
    assert "P99Latency 0.75 (target 0.25) -> 6" in decision.message


def test_a_missing_metric_blocks_scale_down_but_not_scale_up() -> None:
    down = desired_replicas(
        Inputs(now=1000, current=4, readings=[inflight(0), latency(None)], since=0),
        Policy(min_replicas=1, max_replicas=10, down_window=0),
    )
    assert down.replicas == 4
    up = desired_replicas(
        Inputs(now=1000, current=4, readings=[inflight(40), latency(None)], since=0), POLICY
    )
    assert up.replicas == 10


def test_no_data_at_all_keeps_the_count() -> None:
    decision = desired_replicas(Inputs(now=1000, current=3, readings=[inflight(None)]), POLICY)
    assert (decision.replicas, decision.reason) == (3, "NoMetrics")


@pytest.mark.parametrize(
    ("history", "raw", "current", "expected"),
    [
        # Down-window 300 s: the highest recommendation of the last 300 s holds.
        ([Recommendation(800, 6), Recommendation(900, 3)], 2, 6, 6),
        # Older than the window: forgotten.
        ([Recommendation(600, 6), Recommendation(900, 3)], 2, 6, 3),
        # Up-scaling is immediate with a 0 s up-window.
        ([Recommendation(900, 3)], 8, 3, 8),
    ],
)
def test_stabilisation(
    history: list[Recommendation], raw: int, current: int, expected: int
) -> None:
    assert stabilise(1000, raw, current, history, since=0, policy=POLICY) == expected


def test_an_up_window_takes_the_lowest_recommendation() -> None:
    policy = Policy(min_replicas=1, max_replicas=10, up_window=60, down_window=0)
    history = [Recommendation(950, 4), Recommendation(980, 7)]
    assert stabilise(1000, 9, 2, history, since=0, policy=policy) == 4


def test_time_the_history_does_not_cover_counts_as_stay() -> None:
    # The operator restarted 10 s ago: no scale-down until a whole window was observed.
    assert stabilise(1000, 1, 5, [Recommendation(995, 1)], since=990, policy=POLICY) == 5
    assert stabilise(1000, 1, 5, [Recommendation(995, 1)], since=600, policy=POLICY) == 1


def test_bounds_and_maximum_step() -> None:
    policy = Policy(min_replicas=2, max_replicas=8, down_window=0, max_up_step=2, max_down_step=1)
    up = desired_replicas(Inputs(now=1000, current=2, readings=[inflight(400)]), policy)
    assert up.replicas == 4  # wants 8 (max), steps 2 at a time
    down = desired_replicas(Inputs(now=1000, current=6, readings=[inflight(0)]), policy)
    assert down.replicas == 5
    floor = desired_replicas(Inputs(now=1000, current=2, readings=[inflight(0)]), policy)
    assert (floor.replicas, floor.reason) == (2, "Steady")


def test_gpu_capacity_caps_the_count_and_says_so() -> None:
    decision = desired_replicas(
        Inputs(now=1000, current=2, readings=[inflight(40)], capacity=3), POLICY
    )
    assert (decision.replicas, decision.at_capacity) == (3, True)
    assert "hold only 3 replicas" in decision.message
    within = desired_replicas(
        Inputs(now=1000, current=2, readings=[inflight(12)], capacity=3), POLICY
    )
    assert (within.replicas, within.at_capacity) == (3, False)


def test_scale_to_zero_when_idle() -> None:
    policy = Policy(min_replicas=1, max_replicas=4, scale_to_zero=True)
    idle = desired_replicas(Inputs(now=1000, current=2, readings=[inflight(0)], idle=True), policy)
    assert (idle.replicas, idle.reason) == (0, "ScaledToZero")
    asleep = desired_replicas(Inputs(now=1000, current=0, readings=[inflight(None)]), policy)
    assert (asleep.replicas, asleep.reason) == (0, "NoMetrics")
    # Readings at zero (the last scrapes of the pods that just went) wake nothing: minReplicas
    # applies once the activator wakes it (it woke itself right after it slept).
    for last in (0, 1, 12):  # the gone pods' last in-flight readings
        quiet = desired_replicas(Inputs(now=1000, current=0, readings=[inflight(last)]), policy)
        assert (quiet.replicas, quiet.reason) == (0, "Steady")
    busy = desired_replicas(Inputs(now=1000, current=2, readings=[inflight(8)]), policy)
    assert busy.replicas == 2
    no_zero = desired_replicas(
        Inputs(now=1000, current=2, readings=[inflight(0)], idle=True),
        Policy(min_replicas=1, max_replicas=4, down_window=0),
    )
    assert no_zero.replicas == 1  # idleness means nothing without scaleToZero


def node(name: str, gpus: int, product: str = "A100", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product}},
        "spec": {
            "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
            **spec,
        },
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}},
    }


def pod(node_name: str, gpus: int, owner: str = "other", phase: str = "Running") -> dict[str, Any]:
    return {
        "metadata": {"labels": {"owner": owner}},
        "spec": {
            "nodeName": node_name,
            "containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
        },
        "status": {"phase": phase},
    }


POD_SPEC = {
    "nodeSelector": {"nvidia.com/gpu.product": "A100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "containers": [{"resources": {"limits": {"nvidia.com/gpu": "2"}}}],
}


def ours(p: Any) -> bool:
    return bool(p["metadata"]["labels"]["owner"] == "us")


def test_capacity_counts_whole_replicas_per_reachable_node() -> None:
    nodes = [
        node("a", 4),
        node("b", 3),  # one replica; the third GPU is useless to a 2-GPU replica
        node("h", 8, product="H100"),  # other product
        node("c", 4, unschedulable=True),
    ]
    assert replicas_that_fit(nodes, [], POD_SPEC, ours) == 3
    others = [pod("a", 2), pod("b", 1), pod("a", 2, phase="Succeeded")]
    assert replicas_that_fit(nodes, others, POD_SPEC, ours) == 1 + 1
    mine = [pod("a", 2, owner="us"), pod("a", 2, owner="us")]
    assert replicas_that_fit(nodes, mine, POD_SPEC, ours) == 3  # our GPUs are ours to use


def test_untolerated_taints_make_a_node_unreachable() -> None:
    untolerated = {**POD_SPEC, "tolerations": []}
    assert replicas_that_fit([node("a", 4)], [], untolerated, ours) == 0
    assert tolerates([{"operator": "Exists"}], {"key": "x", "effect": "NoExecute"})
    assert tolerates([], {"key": "x", "effect": "PreferNoSchedule"})


def test_the_plugin_shows_the_last_scaling_decision() -> None:
    status = {
        "phase": "Available",
        "autoscaling": {
            "engine": "builtin",
            "desiredReplicas": 4,
            "capacityReplicas": 8,
            "lastDecision": {
                "time": "2026-11-21T08:00:00Z",
                "from": 1,
                "to": 4,
                "reason": "ScaledUp",
                "message": "InFlightPerReplica 7.6 (target 2) -> 4",
            },
        },
    }
    md = ModelDeployment.model_validate(merged(load_example("full.yaml"), {"status": status}))
    text = render_status(md)
    assert "scaling  builtin  desired 4  GPUs hold 8" in text
    assert "ScaledUp 1 -> 4 at 2026-11-21T08:00:00Z: InFlightPerReplica 7.6" in text


class FixedProvider:
    def query(self, promql: str) -> float | None:
        return 4.0  # one replica's worth of requests in flight: steady

    def query_by(self, promql: str, label: str) -> dict[str, float]:
        return {}


def scaling_context(prometheus_url: str | None) -> OperatorContext:
    def provider(url: str) -> MetricsProvider:
        return FixedProvider()

    return OperatorContext(
        api=None,  # type: ignore[arg-type]  # a steady count writes nothing
        build=BuildConfig(runtime_image="x"),
        telemetry=None,  # type: ignore[arg-type]
        gpus=None,  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        metrics_provider=provider,
        prometheus_url=prometheus_url,
    )


def autoscaled() -> ModelDeployment:
    scaling = {"maxReplicas": 3, "metrics": [{"type": "InFlightPerReplica", "target": 4}]}
    doc = merged(load_example("minimal.yaml"), {"spec": {"autoscaling": scaling}})
    doc["metadata"]["namespace"] = "ns"
    return ModelDeployment.model_validate(doc)


def test_the_builtin_engine_without_a_prometheus_url_says_so() -> None:
    """Bug 8: no URL in the spec nor on the operator's command line used to keep the count
    without a word."""
    md = autoscaled()
    result = autoscale(md, scaling_context(None), "r1", now=100.0)
    assert result.view is not None
    assert result.view.reason == "NoMetricsSource"
    assert "spec.autoscaling.prometheus.url" in (result.view.message or "")
    assert "--prometheus-url" in (result.view.message or "")
    status = compute_status(md, Observed(autoscaling=result.view), "r1", "2026-01-01T00:00:00Z")
    # As the HPA says it: ScalingActive False; the model serves on, so it is not Degraded.
    active = next(c for c in status.conditions if c.type == "ScalingActive")
    assert (active.status, active.reason) == ("False", "NoMetricsSource")
    assert active.message.startswith("spec.autoscaling: no Prometheus to read metrics from")
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    assert degraded.status == "False"
    events = transition_events(md.status, status)
    assert [(e.type, e.reason) for e in events if e.reason == "NoMetricsSource"] == [
        ("Warning", "NoMetricsSource")
    ]
    assert status.autoscaling is not None
    assert status.autoscaling.reason == "NoMetricsSource"


def test_the_builtin_engine_with_the_operators_prometheus_url_has_no_such_problem() -> None:
    md = autoscaled()
    result = autoscale(md, scaling_context("http://prometheus:9090"), "r1", now=100.0)
    assert result.view is not None
    assert (result.view.reason, result.view.message) == (None, None)
    status = compute_status(md, Observed(autoscaling=result.view), "r1", "2026-01-01T00:00:00Z")
    active = next(c for c in status.conditions if c.type == "ScalingActive")
    assert (active.status, active.reason) == ("True", "ValidMetricsSource")
