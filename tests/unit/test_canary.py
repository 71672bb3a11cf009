"""The rollout planner's inputs: which mode a revision runs in, steps, and the analysis
measurement (with a fake metrics provider: the real one is tested against Prometheus)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from modeldeploy_operator.api.v1alpha1 import ModelDeployment, parse_duration
from modeldeploy_operator.builders.deployment import BuildConfig
from modeldeploy_operator.context import OperatorContext
from modeldeploy_operator.metrics.prometheus import ProviderError
from modeldeploy_operator.observe import measure
from modeldeploy_operator.rollout.decide import Step
from modeldeploy_operator.rollout.plan import mode, stalled, steps_of
from support import load_example, merged


def md(status: dict[str, Any] | None = None, **spec: Any) -> ModelDeployment:
    doc = merged(load_example("full.yaml"), {"spec": spec, "metadata": {"namespace": "ns"}})
    doc["status"] = status or {}
    return ModelDeployment.model_validate(doc)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("1m30s", 90), ("500ms", 0.5), ("2h", 7200)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_steps_of_the_full_example() -> None:
    assert steps_of(md()) == (Step(10, pause_seconds=60), Step(50, manual=True), Step(100))


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({}, "rolling"),  # first deployment
        ({"stable": {"revision": "r1"}, "phase": "Available"}, "canary"),
        # Whatever the phase (after a rollback, mid scale-up, a pod Pending): still judged.
        ({"stable": {"revision": "r1"}, "phase": "Degraded"}, "canary"),
        ({"stable": {"revision": "r1"}, "phase": "Progressing"}, "canary"),
        (
            {"stable": {"revision": "r1"}, "phase": "Progressing", "canary": {"revision": "r2"}},
            "canary",
        ),
        # A newer spec during a rollout starts over as a canary: never straight to stable.
        (
            {"stable": {"revision": "r1"}, "phase": "Progressing", "canary": {"revision": "r0"}},
            "canary",
        ),
        ({"stable": {"revision": "r2"}, "phase": "Available"}, "rolling"),  # nothing new
        (
            {"stable": {"revision": "r1"}, "rollback": {"revision": "r2", "reason": "RolledBack"}},
            "held",
        ),
    ],
)
def test_mode(status: dict[str, Any], expected: str) -> None:
    assert mode(md(status), "r2") == expected


class FakeProvider:
    def __init__(self, values: dict[str, float | Exception | None]) -> None:
        self.values = values
        self.queries: list[str] = []

    def query_by(self, promql: str, label: str) -> dict[str, float]:
        return {}

    def query(self, promql: str) -> float | None:
        self.queries.append(promql)
        for needle, value in self.values.items():
            if needle in promql:
                if isinstance(value, Exception):
                    raise value
                return value
        return None


def context(provider: FakeProvider) -> OperatorContext:
    return OperatorContext(
        api=None,  # type: ignore[arg-type]  # analyse never calls the API
        build=BuildConfig(runtime_image="x"),
        telemetry=None,  # type: ignore[arg-type]
        gpus=None,  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        metrics_provider=lambda url: provider,
    )


def test_analysis_passes_fails_and_is_inconclusive() -> None:
    healthy = FakeProvider({"histogram_quantile": 0.1, "requests_total": 0.0, "drift_score": 0.05})
    check = measure(md(), context(healthy), now=100.0)
    assert (check.result, check.message, check.time) == (
        "Passed",
        "all metrics within bounds",
        100.0,
    )
    assert [(r.name, r.result) for r in check.results] == [
        ("p99", "Passed"),
        ("errors", "Passed"),
        ("drift", "Passed"),
    ]
    assert all(
        'namespace="ns", modeldeployment="bert-large", track="canary"' in q for q in healthy.queries
    )
    slow = FakeProvider({"histogram_quantile": 0.6, "requests_total": 0.0, "drift_score": 0.05})
    check = measure(md(), context(slow), now=100.0)
    assert (check.result, check.message) == ("Failed", "p99 = 0.6 (max 0.25)")
    down = FakeProvider({"histogram_quantile": ProviderError("Prometheus unreachable")})
    check = measure(md(), context(down), now=100.0)
    assert check.result == "Inconclusive"
    assert "unreachable" in check.message


def test_a_stalled_canary_is_a_failure() -> None:
    stuck = {
        "status": {
            "conditions": [
                {
                    "type": "Progressing",
                    "status": "False",
                    "reason": "ProgressDeadlineExceeded",
                    "message": "timed out",
                }
            ]
        }
    }
    assert stalled(stuck) == "ProgressDeadlineExceeded: timed out"
    assert (
        stalled(
            {
                "status": {
                    "conditions": [{"type": "Progressing", "reason": "NewReplicaSetAvailable"}]
                }
            }
        )
        is None
    )
    assert stalled(None) is None
