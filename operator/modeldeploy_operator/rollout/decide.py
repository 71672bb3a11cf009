"""The canary state machine: one pure decision per reconcile, all state in ``status``.

After Flagger's ``advanceCanary`` and Argo Rollouts' ``rolloutContext``: given where the
rollout is (:class:`Progress`, persisted in ``status.canary``), the steps, and what was just
observed, :func:`decide_step` says what to do and returns the next progress. Nothing else
is remembered, so an operator restarted at any point resumes exactly where it was.

Rules, in order:

1. manual ``abort`` or ``rollback``, or failing canary pods: back to 100 % stable at once;
2. a failed analysis counts towards ``failureLimit``; reaching it rolls back. An
   inconclusive one (no data, Prometheus down) is neither a pass nor a failure: the step
   waits, as Argo Rollouts pauses on an inconclusive run;
3. manual ``promote`` skips the remaining steps; ``pause`` and ``resume`` hold and release;
4. a step waits for its canary pods to be Ready, then for its pause (a duration counted from
   that moment, or ``manual`` until ``resume``), then for its latest analysis to have passed;
   then the next step. A step whose canary pods are not all Ready counts no time and no
   checks: a model that loads for longer than the pause still gets its whole window;
5. after the last step the canary is promoted. An unanalysed revision, or one whose latest
   check did not pass, is never promoted except by a user.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Literal

from modeldeploy_operator.rollout.analysis import Result

Command = Literal["promote", "abort", "pause", "resume", "rollback"]
Action = Literal["Wait", "Advance", "Promote", "Rollback", "Abort"]


@dataclass(frozen=True)
class Step:
    weight: int  # percent of user traffic on the canary; 0 in a shadow step
    pause_seconds: float | None = None  # None: no pause
    manual: bool = False
    shadow: int = 0  # a shadow step: percent of stable's requests copied to the canary


@dataclass(frozen=True)
class Progress:
    """What ``status.canary`` records about a rollout in flight."""

    revision: str
    step: int = 0
    step_started: float = 0.0  # epoch seconds: when the step was entered
    failed_checks: int = 0
    inconclusive_checks: int = 0  # in a row: a Passed or Failed check ends the run
    passed_in_step: int = 0  # passed checks in this step since its last failed or inconclusive
    paused: bool = False
    ready_since: float | None = None  # when this step's canary pods were all Ready


@dataclass(frozen=True)
class Observation:
    now: float
    canary_ready: bool  # the step's canary replicas are Ready
    canary_failure: str | None = None  # crash loop, model fetch failure, progress deadline
    analysis: Result | None = None  # the check that completed since the last decision, if any
    analysis_message: str = ""
    analysis_configured: bool = True
    failure_limit: int = 2
    inconclusive_limit: int = 0  # 0: no limit
    on_inconclusive: Literal["Pause", "Rollback"] = "Pause"
    command: Command | None = None
    stable_missing: bool = False  # the stable Deployment is gone: nothing to compare against
    # The latest check's verdict when none completed this pass (for the status message only).
    latest: Result | None = None
    latest_message: str = ""


@dataclass(frozen=True)
class Decision:
    action: Action
    progress: Progress
    weight: int  # canary traffic percent to apply now
    reason: str
    message: str


def decide_step(progress: Progress, steps: tuple[Step, ...], seen: Observation) -> Decision:
    """The next action and progress; see the module's rules."""
    steps = steps or (Step(weight=100),)
    failed = progress.failed_checks + (seen.analysis == "Failed")
    passed = progress.passed_in_step + 1 if seen.analysis == "Passed" else progress.passed_in_step
    if seen.analysis in ("Failed", "Inconclusive"):
        passed = 0  # the latest check must pass before the rollout moves on
    ready_since = None
    if seen.canary_ready:
        ready_since = seen.now if progress.ready_since is None else progress.ready_since
    inconclusive = progress.inconclusive_checks
    if seen.analysis is not None and not progress.paused:  # paused: counting changes nothing
        inconclusive = inconclusive + 1 if seen.analysis == "Inconclusive" else 0
    counted = replace(
        progress,
        failed_checks=failed,
        inconclusive_checks=inconclusive,
        passed_in_step=passed,
        ready_since=ready_since,
    )
    return _stop(counted, seen) or _hold(counted, steps, seen) or _advance(counted, steps, seen)


def _stop(progress: Progress, seen: Observation) -> Decision | None:
    """Rules 1-2: everything that ends the rollout with traffic back on stable."""
    if seen.command == "abort":
        return Decision("Abort", progress, 0, "Aborted", "aborted by a user")
    if seen.command == "rollback":
        return Decision("Rollback", progress, 0, "RolledBack", "rolled back by a user")
    if seen.canary_failure is not None:
        message = f"canary pods failed: {seen.canary_failure}"
        return Decision("Rollback", progress, 0, "RolledBack", message)
    if seen.analysis == "Failed" and progress.failed_checks >= max(1, seen.failure_limit):
        message = f"analysis failed {progress.failed_checks} times: {seen.analysis_message}"
        return Decision("Rollback", progress, 0, "RolledBack", message)
    if too_inconclusive(progress, seen) and seen.on_inconclusive == "Rollback":
        message = (
            f"analysis inconclusive {progress.inconclusive_checks} times in a row:"
            f" {seen.analysis_message}"
        )
        return Decision("Rollback", progress, 0, "RolledBack", message)
    return None


def too_inconclusive(progress: Progress, seen: Observation) -> bool:
    """``inconclusiveLimit`` inconclusive checks in a row, the last one just now."""
    return (
        seen.analysis == "Inconclusive"
        and seen.inconclusive_limit > 0
        and progress.inconclusive_checks >= seen.inconclusive_limit
    )


def _hold(progress: Progress, steps: tuple[Step, ...], seen: Observation) -> Decision | None:
    """Rules 3-4: manual promotion, pauses, and everything a step waits for."""
    current = steps[min(progress.step, len(steps) - 1)]
    if seen.command == "promote":
        return Decision("Promote", progress, 100, "Promoted", "promoted by a user")
    stalled = too_inconclusive(progress, seen)  # and onInconclusive is Pause: _stop rolls back
    paused = (progress.paused or seen.command == "pause" or stalled) and seen.command != "resume"
    if seen.command == "resume":
        progress = replace(progress, inconclusive_checks=0)  # a user decided: count again
    waiting = replace(progress, paused=paused)
    step = progress.step + 1
    since = progress.ready_since
    if paused:
        reason, message = _paused(progress, seen)
    elif seen.stable_missing:
        reason, message = (
            "StableMissing",
            "the stable Deployment is gone; the rollout holds until it is back"
            " (promote or abort to decide by hand)",
        )
    elif not seen.canary_ready or since is None:
        reason, message = "WaitingForCanary", "waiting for canary pods to be Ready"
    elif current.manual and seen.command != "resume":
        reason, message = "WaitingForPromotion", f"step {step} waits for resume or promote"
    elif current.pause_seconds is not None and seen.now - since < current.pause_seconds:
        # The end, not a countdown: the same text every pass, so waiting writes no status.
        until = dt.datetime.fromtimestamp(since + current.pause_seconds, dt.UTC)
        pause = f"{current.pause_seconds:g}s"
        reason, message = "Pausing", f"step {step}: pausing {pause} until {until:%H:%M:%SZ}"
    elif seen.analysis_configured and progress.passed_in_step == 0:
        latest = seen.analysis or seen.latest
        why = seen.analysis_message if seen.analysis else seen.latest_message
        if latest == "Inconclusive":
            reason = "AnalysisInconclusive"
            message = f"step {step}: analysis inconclusive ({why}); waiting"
        elif latest == "Failed":
            reason = "AnalysisFailed"
            message = (
                f"step {step}: analysis failed {progress.failed_checks}"
                f" of {max(1, seen.failure_limit)} times ({why})"
            )
        else:
            reason, message = "Analyzing", f"step {step} waits for a passed analysis"
    else:
        return None
    return Decision("Wait", waiting, current.weight, reason, message)


def _paused(progress: Progress, seen: Observation) -> tuple[str, str]:
    """Why a paused rollout is paused: a user, or inconclusiveLimit (the same text every
    pass, so waiting writes no status)."""
    limit = seen.inconclusive_limit
    if limit > 0 and progress.inconclusive_checks >= limit:
        return (
            "AnalysisInconclusive",
            f"paused after {limit} inconclusive analyses in a row: resume, promote or abort",
        )
    return "Paused", "paused by a user"


def _advance(progress: Progress, steps: tuple[Step, ...], seen: Observation) -> Decision:
    """Rule 5: the next step, or promotion after the last."""
    if progress.step + 1 >= len(steps):
        return Decision("Promote", progress, 100, "Promoted", "every step passed")
    following = steps[progress.step + 1]
    advanced = replace(
        progress,
        step=progress.step + 1,
        step_started=seen.now,
        passed_in_step=0,
        paused=False,
        ready_since=None,
    )
    message = f"step {progress.step + 2} of {len(steps)}: {describe_step(following)}"
    return Decision("Advance", advanced, following.weight, "StepAdvanced", message)


def describe_step(step: Step) -> str:
    if step.shadow:
        return f"{step.shadow}% of requests copied to the canary (shadow: it serves no user)"
    return f"{step.weight}% to the canary"


def step_replicas(total: int, step: Step) -> int:
    """Canary pods a step wants: its weight's share; in a shadow step, the copied share's
    (the canary's load is that share of stable's), at least one."""
    if step.shadow:
        return max(1, -(-total * step.shadow // 100))
    return canary_replicas(total, step.weight)


def canary_replicas(total: int, weight: int) -> int:
    """Canary replicas for a traffic weight under the replica-ratio router: ceil(w * total),
    at least one while the weight is above zero."""
    if weight <= 0:
        return 0
    return max(1, -(-total * weight // 100))
