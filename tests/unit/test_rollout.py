"""The canary state machine and metric assessment: table tests."""

from __future__ import annotations

import math

import pytest

from modeldeploy_operator.promql import BUILTIN_QUERIES, TemplateError, render_query
from modeldeploy_operator.rollout.analysis import Measurement, assess, describe, verdict
from modeldeploy_operator.rollout.decide import (
    Observation,
    Progress,
    Step,
    canary_replicas,
    decide_step,
)

STEPS = (Step(10, pause_seconds=60), Step(50, manual=True), Step(100))
START = Progress(revision="r2", step=0, step_started=1000.0, ready_since=1000.0)


def seen(**kwargs: object) -> Observation:
    base: dict[str, object] = {"now": 1000.0, "canary_ready": True}
    return Observation(**(base | kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("progress", "observation", "action", "weight", "reason"),
    [
        # Waiting: pods, pause, analysis.
        (START, seen(canary_ready=False, analysis="Passed"), "Wait", 10, "WaitingForCanary"),
        (START, seen(now=1030.0, analysis="Passed"), "Wait", 10, "Pausing"),
        (START, seen(now=1061.0), "Wait", 10, "Analyzing"),  # pause over, nothing analysed
        (START, seen(now=1061.0, analysis="Passed"), "Advance", 50, "StepAdvanced"),
        (START, seen(now=1061.0, analysis_configured=False), "Advance", 50, "StepAdvanced"),
        # A manual step waits for resume (or promote).
        (Progress("r2", step=1, passed_in_step=1), seen(), "Wait", 50, "WaitingForPromotion"),
        (
            Progress("r2", step=1, passed_in_step=1),
            seen(command="resume"),
            "Advance",
            100,
            "StepAdvanced",
        ),
        # The last step promotes once analysed.
        (Progress("r2", step=2), seen(analysis="Passed"), "Promote", 100, "Promoted"),
        (Progress("r2", step=2), seen(), "Wait", 100, "Analyzing"),
        # Failures.
        (START, seen(analysis="Failed", failure_limit=2), "Wait", 10, "Pausing"),
        (
            Progress("r2", failed_checks=1),
            seen(analysis="Failed", failure_limit=2),
            "Rollback",
            0,
            "RolledBack",
        ),
        # Inconclusive (no data, Prometheus down) is neither: the step waits, and the latest
        # check must pass again before the rollout moves on.
        (
            Progress("r2", failed_checks=1, ready_since=0.0),
            seen(analysis="Inconclusive", failure_limit=2),
            "Wait",
            10,
            "AnalysisInconclusive",
        ),
        (
            Progress("r2", passed_in_step=3, ready_since=0.0),
            seen(analysis="Inconclusive"),
            "Wait",
            10,
            "AnalysisInconclusive",
        ),
        # Bug 5: a step whose checks passed and then failed is not left, nor promoted.
        (
            Progress("r2", step=2, passed_in_step=1, failed_checks=0, ready_since=0.0),
            seen(analysis="Failed", failure_limit=3),
            "Wait",
            100,
            "AnalysisFailed",
        ),
        # Bug 10: the pause counts from the canary pods being Ready, not from the step's start.
        (
            Progress("r2", step=0, step_started=0.0, ready_since=None),
            seen(now=1000.0, analysis="Passed"),
            "Wait",
            10,
            "Pausing",
        ),
        (
            Progress("r2", step=0, step_started=0.0, ready_since=990.0),
            seen(now=1000.0, canary_ready=False),
            "Wait",
            10,
            "WaitingForCanary",
        ),
        # Bug 2: no stable Deployment, nothing to compare with: hold (a user may still decide).
        (
            START,
            seen(now=1061.0, analysis="Passed", stable_missing=True),
            "Wait",
            10,
            "StableMissing",
        ),
        (START, seen(analysis="Failed", failure_limit=0), "Rollback", 0, "RolledBack"),
        (START, seen(canary_failure="CrashLoopBackOff"), "Rollback", 0, "RolledBack"),
        # Manual control.
        (START, seen(command="abort"), "Abort", 0, "Aborted"),
        (START, seen(command="rollback"), "Rollback", 0, "RolledBack"),
        (START, seen(command="promote"), "Promote", 100, "Promoted"),
        (START, seen(command="pause", now=2000.0, analysis="Passed"), "Wait", 10, "Paused"),
        (Progress("r2", paused=True), seen(now=2000.0, analysis="Passed"), "Wait", 10, "Paused"),
        (
            Progress("r2", paused=True, ready_since=0.0),
            seen(command="resume", now=2000.0, analysis="Passed"),
            "Advance",
            50,
            "StepAdvanced",
        ),
    ],
)
def test_decide_step(
    progress: Progress, observation: Observation, action: str, weight: int, reason: str
) -> None:
    decision = decide_step(progress, STEPS, observation)
    assert (decision.action, decision.weight, decision.reason) == (action, weight, reason)


def test_advancing_resets_the_step_and_keeps_the_revision() -> None:
    decision = decide_step(START, STEPS, seen(now=1061.0, analysis="Passed"))
    assert decision.progress == Progress(
        "r2", step=1, step_started=1061.0, failed_checks=0, passed_in_step=0, ready_since=None
    )


def test_deciding_twice_on_the_same_state_does_not_advance_twice() -> None:
    """A restarted operator re-deciding from persisted status lands on the same step."""
    first = decide_step(START, STEPS, seen(now=1061.0, analysis="Passed"))
    again = decide_step(first.progress, STEPS, seen(now=1062.0))
    assert again.action == "Wait"
    assert again.progress.step == first.progress.step == 1


def test_inconclusive_checks_in_a_row_pause_or_roll_back_at_the_limit() -> None:
    """inconclusiveLimit: 3 checks without data in a row, and the rollout pauses (or rolls
    back); a check with a verdict ends the run; 0 waits forever, as before."""
    no_data = {"now": 1061.0, "analysis": "Inconclusive", "analysis_message": "no data"}
    progress = START
    for _ in range(2):
        decision = decide_step(progress, STEPS, seen(inconclusive_limit=3, **no_data))
        assert (decision.action, decision.reason) == ("Wait", "AnalysisInconclusive")
        assert not decision.progress.paused
        progress = decision.progress
    assert progress.inconclusive_checks == 2
    # A verdict in between starts the count again.
    passed = decide_step(progress, STEPS, seen(inconclusive_limit=3, now=1061.0, analysis="Passed"))
    assert passed.progress.inconclusive_checks == 0

    paused = decide_step(progress, STEPS, seen(inconclusive_limit=3, **no_data))
    assert (paused.action, paused.reason) == ("Wait", "AnalysisInconclusive")
    assert paused.progress.paused
    assert "3 inconclusive analyses in a row" in paused.message
    still = decide_step(paused.progress, STEPS, seen(inconclusive_limit=3, now=1070.0))
    assert (still.progress.paused, still.message) == (True, paused.message)  # no status churn
    more = decide_step(paused.progress, STEPS, seen(inconclusive_limit=3, **no_data))
    assert more.progress == paused.progress  # checks while paused write nothing new
    resumed = decide_step(
        paused.progress, STEPS, seen(inconclusive_limit=3, now=1070.0, command="resume")
    )
    assert not resumed.progress.paused
    assert resumed.progress.inconclusive_checks == 0

    rollback = seen(inconclusive_limit=3, on_inconclusive="Rollback", **no_data)
    decision = decide_step(progress, STEPS, rollback)
    assert (decision.action, decision.reason) == ("Rollback", "RolledBack")
    assert "inconclusive 3 times in a row" in decision.message

    forever = START
    for _ in range(10):
        forever = decide_step(forever, STEPS, seen(**no_data)).progress
    assert not forever.paused


def test_rollback_message_names_the_metric() -> None:
    decision = decide_step(
        Progress("r2", failed_checks=1),
        STEPS,
        seen(analysis="Failed", analysis_message="p99 = 0.612 (max 0.25)"),
    )
    assert "p99 = 0.612 (max 0.25)" in decision.message


@pytest.mark.parametrize(
    ("total", "weight", "expected"), [(4, 10, 1), (4, 50, 2), (3, 50, 2), (4, 0, 0), (10, 100, 10)]
)
def test_canary_replicas(total: int, weight: int, expected: int) -> None:
    assert canary_replicas(total, weight) == expected


@pytest.mark.parametrize(
    ("measurement", "result"),
    [
        (Measurement("p99", 0.1, max=0.25), "Passed"),
        (Measurement("p99", 0.3, max=0.25), "Failed"),
        (Measurement("ok", 0.5, min=0.9), "Failed"),
        (Measurement("p99", None, max=0.25), "Inconclusive"),  # no data is never success
        (Measurement("p99", math.nan, max=0.25), "Inconclusive"),
        (Measurement("p99", 0.1, max=0.25, error="Prometheus unreachable"), "Inconclusive"),
    ],
)
def test_assess(measurement: Measurement, result: str) -> None:
    assert assess(measurement) == result


def test_verdict_prefers_failure_then_inconclusive() -> None:
    ok, slow, unknown = (
        Measurement("a", 1, max=2),
        Measurement("b", 3, max=2),
        Measurement("c", None, max=1),
    )
    assert verdict([ok]) == ("Passed", None)
    assert verdict([ok, unknown]) == ("Inconclusive", unknown)
    assert verdict([unknown, slow, ok]) == ("Failed", slow)
    assert describe(slow) == "b = 3 (max 2)"
    assert describe(unknown) == "c: no data"


def test_query_templates_fail_on_a_missing_variable() -> None:
    query = render_query(
        BUILTIN_QUERIES["ErrorRatio"], {"selector": 'namespace="ns"', "interval": "30s"}
    )
    assert 'namespace="ns", track="canary"' in query
    assert "$" not in query
    with pytest.raises(TemplateError, match=r"\$interval"):
        render_query(BUILTIN_QUERIES["P99Latency"], {"selector": 'namespace="ns"'})


def test_relative_latency_compares_the_tracks() -> None:
    query = render_query(
        BUILTIN_QUERIES["RelativeP99Latency"], {"selector": 'namespace="ns"', "interval": "30s"}
    )
    assert query.count('track="canary"') == 1
    assert query.count('track="stable"') == 1
