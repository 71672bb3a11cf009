"""Shadow steps in the planner and the builders: the canary runs behind the serving gate
beside a whole stable, stable's sidecars are told where to copy, the gate opens only once the
rollout is past its shadow steps, and the shadow builtins name the worst output."""

from __future__ import annotations

import logging
from typing import Any

from modeldeploy_operator.api.v1alpha1 import (
    AnalysisResult,
    ModelDeployment,
    ModelDeploymentStatus,
    TrackStatus,
)
from modeldeploy_operator.builders.deployment import SERVING_GATE, BuildConfig, build_deployment
from modeldeploy_operator.builders.shadow import build_shadow_configmap
from modeldeploy_operator.context import OperatorContext
from modeldeploy_operator.observe import measure
from modeldeploy_operator.plugin import render_status
from modeldeploy_operator.rollout.plan import (
    Check,
    TrackState,
    World,
    plan_rollout,
    step_ready,
    track_state,
)
from support import load_example, merged

SHADOW_STEPS = [{"shadow": {"percent": 10}, "pause": "1m"}, {"weight": 50}, {"weight": 100}]


def iris(steps: list[dict[str, Any]] | None = None, **status: Any) -> ModelDeployment:
    doc = merged(load_example("iris.yaml"), {"metadata": {"namespace": "ns"}})
    doc["spec"]["rollout"]["steps"] = SHADOW_STEPS if steps is None else steps
    md = ModelDeployment.model_validate(doc)
    promoted = ModelDeploymentStatus(stable=TrackStatus(version="1", revision="r1"), **status)
    return md.model_copy(update={"status": promoted})


def canary(
    ready: int = 0, loaded: int = 1, gated: tuple[str, ...] = ("iris-canary-a",)
) -> TrackState:
    return TrackState(
        True,
        "r2",
        replicas=1,
        ready=ready,
        rolled=False,
        loaded=loaded,
        addresses=("10.88.0.7",),
        gated=gated,
    )


STABLE = TrackState(True, "r1", replicas=2, ready=2, rolled=True)


def test_a_shadow_step_runs_the_canary_beside_a_whole_stable_and_names_its_address() -> None:
    plan = plan_rollout(iris(), "r2", World(STABLE, canary()), now=100.0)
    assert (plan.targets.stable_replicas, plan.targets.canary_replicas) == (2, 1)
    assert plan.shadow is not None
    assert (plan.shadow.revision, plan.shadow.percent) == ("r2", 10)
    assert plan.shadow.targets == ("10.88.0.7",)
    assert plan.admit == ()  # the gate stays shut: no user reaches the canary
    status = plan.view.canary
    assert status is not None
    assert (status.weight, status.shadow, status.step) == (0, 10, 0)


def test_a_shadow_step_counts_loaded_pods_behind_the_gate_as_ready() -> None:
    md = iris()
    assert step_ready(md, "r2", World(STABLE, canary(ready=0, loaded=1)))
    assert not step_ready(md, "r2", World(STABLE, canary(ready=0, loaded=0)))


def shadowing_since(step_started: float) -> ModelDeployment:
    return iris(
        canary=TrackStatus(
            version="2",
            revision="r2",
            step=0,
            step_started=step_started,
            ready_since=step_started,
            started=step_started,
            last_analysis=step_started,
            passed_checks=1,
        )
    )


def test_past_the_shadow_steps_the_gate_opens_for_the_canary_pods() -> None:
    plan = plan_rollout(shadowing_since(0.0), "r2", World(STABLE, canary()), now=1000.0)
    assert plan.decision is not None
    assert plan.decision.action == "Advance"
    assert plan.admit == ("iris-canary-a",)
    assert plan.shadow is None  # stable's sidecars stop copying


def test_a_failed_shadow_analysis_rolls_back_without_opening_the_gate() -> None:
    failed = Check("Failed", "disagree on output probabilities = 0.6 (max 0.05)", (), 1000.0)
    md = shadowing_since(900.0)
    assert md.status.canary is not None
    counted = md.status.canary.model_copy(update={"failed_checks": 2})
    md = md.model_copy(update={"status": md.status.model_copy(update={"canary": counted})})
    plan = plan_rollout(md, "r2", World(STABLE, canary(), check=failed), now=1000.0)
    assert plan.decision is not None
    assert plan.decision.action == "Rollback"
    assert "output probabilities" in plan.decision.message
    assert plan.admit == ()
    assert plan.targets.canary == "delete"


def test_a_canary_overtaken_by_a_newer_spec_is_never_let_in() -> None:
    plan = plan_rollout(iris(), "r3", World(STABLE, canary()), now=100.0)
    assert plan.admit == ()


def test_gated_pods_are_loaded_but_not_ready_and_not_stalled() -> None:
    deployment = build_deployment(iris(), "canary", "r2", BuildConfig(runtime_image="rt"), 1)
    assert deployment["spec"]["template"]["spec"]["readinessGates"] == [
        {"conditionType": SERVING_GATE}
    ]
    deployment["metadata"]["generation"] = 1
    deployment["status"] = {
        "observedGeneration": 1,
        "replicas": 1,
        "conditions": [
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
        ],
    }
    pod = {
        "metadata": {
            "name": "iris-canary-a",
            "labels": deployment["spec"]["template"]["metadata"]["labels"],
        },
        "spec": {"readinessGates": [{"conditionType": SERVING_GATE}]},
        "status": {
            "podIP": "10.88.0.7",
            "conditions": [
                {"type": "ContainersReady", "status": "True"},
                {"type": "Ready", "status": "False"},
            ],
        },
    }
    state = track_state(deployment, [pod], "canary")
    assert (state.ready, state.loaded, state.failure) == (0, 1, None)
    assert state.addresses == ("10.88.0.7",)
    assert state.gated == ("iris-canary-a",)
    pod["status"]["conditions"].append({"type": SERVING_GATE, "status": "True"})
    assert track_state(deployment, [pod], "canary").gated == ()


def test_only_the_canary_of_a_rollout_with_shadow_steps_has_the_gate() -> None:
    config = BuildConfig(runtime_image="rt")
    stable = build_deployment(iris(), "stable", "r1", config)["spec"]["template"]["spec"]
    plain = build_deployment(iris([{"weight": 50}]), "canary", "r2", config)
    assert "readinessGates" not in stable
    assert "readinessGates" not in plain["spec"]["template"]["spec"]
    # Every sidecar reads the shadow config, whatever its track.
    (runtime,) = [c for c in stable["containers"] if c["name"] == "runtime"]
    assert "--shadow-file=/etc/modeldeploy/shadow/shadow.json" in runtime["args"]


def test_the_shadow_configmap_is_empty_outside_shadow_steps() -> None:
    empty = build_shadow_configmap(iris(), "", "", 0, ())
    assert empty["data"] == {"shadow.json": "{}"}
    full = build_shadow_configmap(iris(), "r2", "2", 10, ("10.88.0.7",))
    assert '"targets": ["10.88.0.7:8080"]' in full["data"]["shadow.json"]
    assert '"grpcTargets": ["10.88.0.7:8081"]' in full["data"]["shadow.json"]


class ByOutput:
    """A Prometheus whose per-output queries answer ``values``."""

    def __init__(self, values: dict[str, float]) -> None:
        self.values = values
        self.queries: list[str] = []

    def query_by(self, promql: str, label: str) -> dict[str, float]:
        self.queries.append(promql)
        assert label == "output"
        return self.values

    def query(self, promql: str) -> float | None:
        self.queries.append(promql)
        return 0.0


def measured(doc: dict[str, Any], provider: ByOutput) -> Check:
    """One analysis of the canary at revision r2, against ``provider``."""
    ctx = OperatorContext(
        api=None,  # type: ignore[arg-type]  # measure never calls the API
        build=BuildConfig(runtime_image="x"),
        telemetry=None,  # type: ignore[arg-type]
        gpus=None,  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        metrics_provider=lambda url: provider,
    )
    return measure(ModelDeployment.model_validate(doc), ctx, 100.0, "r2")


def shadow_analysis(values: dict[str, float]) -> tuple[Check, ByOutput]:
    doc = merged(load_example("iris.yaml"), {"metadata": {"namespace": "ns"}})
    doc["spec"]["rollout"]["steps"] = SHADOW_STEPS
    doc["spec"]["rollout"]["analysis"]["metrics"] = [
        {"name": "disagree", "builtin": "OutputDisagreement", "max": 0.05},
        {"name": "errors", "builtin": "ShadowErrorRatio", "max": 0.01},
    ]
    doc["spec"]["rollout"]["analysis"]["prometheus"] = {"url": "http://prometheus"}
    provider = ByOutput(values)
    return measured(doc, provider), provider


def test_the_worst_output_decides_and_is_named() -> None:
    check, provider = shadow_analysis({"probabilities": 0.62, "label": 0.01, "empty": float("nan")})
    assert check.result == "Failed"
    assert check.results[0].detail == "output probabilities"
    assert check.message == "disagree on output probabilities = 0.62 (max 0.05)"
    assert all('revision="r2"' in q for q in provider.queries)
    check, _ = shadow_analysis({})
    assert check.result == "Inconclusive"  # no rows compared: nobody measured the canary


def test_the_plugin_shows_the_shadow_step_and_the_worst_output() -> None:
    md = iris(
        canary=TrackStatus(version="2", revision="r2", step=0, weight=0, shadow=10),
        analysis=[
            AnalysisResult(
                name="disagree",
                value=0.62,
                max=0.05,
                result="Failed",
                detail="output probabilities",
            )
        ],
    )
    text = render_status(md)
    assert "step 1/3  shadow: 10% of requests copied, no user served" in text
    assert "disagree" in text
    assert "Failed  (output probabilities)" in text


def test_shadow_builtins_are_not_measured_in_weighted_steps() -> None:
    weighted = iris(canary=TrackStatus(version="2", revision="r2", step=1))
    doc = weighted.model_dump(by_alias=True, exclude_none=True)
    doc["spec"]["rollout"]["analysis"]["metrics"] = [
        {"name": "disagree", "builtin": "OutputDisagreement", "max": 0.05},
        {"name": "errors", "builtin": "ErrorRatio", "max": 0.01},
    ]
    doc["spec"]["rollout"]["analysis"]["prometheus"] = {"url": "http://prometheus"}
    provider = ByOutput({"probabilities": 0.9})
    check = measured(doc, provider)
    assert [r.name for r in check.results] == ["errors"]
    assert not any("shadow" in q for q in provider.queries)
