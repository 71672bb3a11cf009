"""Canary rollouts: observe, decide (pure, in ``rollout/``), act; all state in ``status``.

A new revision of an Available ModelDeployment with ``spec.rollout.strategy: Canary`` runs
as ``<name>-canary`` beside the untouched ``<name>-stable``. The Service selects both tracks,
so traffic splits by the ratio of ready pods: the canary gets ceil(weight x total) of the
total replicas and stable the rest, so no extra GPUs are used. Each reconcile decides one step
with :func:`decide_step`; promotion rolls the stable Deployment to the new revision and removes
the canary; a rollback or abort removes the canary at once and remembers the revision, which
is not retried until the spec changes.

Manual control: the annotation ``serving.modeldeploy.io/command`` (promote, abort, pause,
resume, rollback; retry for a held revision), consumed once acted on.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, cast

from modeldeploy_operator.api.v1alpha1 import (
    GROUP,
    AnalysisResult,
    HistoryEntry,
    ModelDeployment,
    RollbackStatus,
    TrackStatus,
    parse_duration,
)
from modeldeploy_operator.builders.deployment import build_deployment
from modeldeploy_operator.builders.labels import TRACK_LABEL, deployment_name, metric_selector
from modeldeploy_operator.builders.route import gateway_routing
from modeldeploy_operator.context import OperatorContext
from modeldeploy_operator.drift import needs_apply
from modeldeploy_operator.metrics.prometheus import ProviderError
from modeldeploy_operator.rollout.analysis import (
    BUILTIN_QUERIES,
    Measurement,
    TemplateError,
    assess,
    describe,
    render_query,
    verdict,
)
from modeldeploy_operator.rollout.decide import (
    Command,
    Decision,
    Observation,
    Progress,
    Step,
    canary_replicas,
    decide_step,
)
from modeldeploy_operator.status import RolloutView, pod_problems

COMMAND_ANNOTATION = f"{GROUP}/command"
COMMANDS = ("promote", "abort", "pause", "resume", "rollback", "retry")
CANARY_FAILURES = {
    "ImagePullBackOff",
    "ModelFetchFailed",
    "CrashLoopBackOff",
    "ContainerConfigError",
}
HISTORY_LIMIT = 10


def steps_of(md: ModelDeployment) -> tuple[Step, ...]:
    rollout = md.spec.rollout
    steps = [
        Step(
            weight=s.weight,
            pause_seconds=None if s.pause in (None, "manual") else parse_duration(s.pause),
            manual=s.pause == "manual",
        )
        for s in (rollout.steps if rollout else [])
    ]
    return tuple(steps) or (Step(weight=100),)


def mode(md: ModelDeployment, revision: str) -> str:
    """``rolling`` (apply the spec to stable), ``canary`` (a rollout runs) or ``held`` (this
    revision failed its rollout: stable keeps the promoted one)."""
    status = md.status
    if status.rollback is not None and status.rollback.revision == revision:
        return "held"
    rollout = md.spec.rollout
    promoted = status.stable.revision if status.stable else None
    if rollout is None or rollout.strategy != "Canary" or promoted in (None, revision):
        return "rolling"
    if status.canary is not None:
        return "canary"  # this revision's rollout, or a newer spec: it starts over, analysed
    return "canary" if status.phase == "Available" else "rolling"


def iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CanaryResult:
    view: RolloutView
    canary_deployment: dict[str, Any] | None
    decision: Decision
    promote: bool  # the caller applies the new revision to stable
    requeue_after: float | None = None  # when the rollout next needs a look


def next_look(
    md: ModelDeployment, progress: Progress, steps: tuple[Step, ...], now: float, last: float | None
) -> float:
    """Seconds until something changes by itself: the next analysis or the end of a pause.
    Watch events cover the rest (pods becoming ready); at most a few seconds, as a floor."""
    waits = [5.0]
    analysis = md.spec.rollout.analysis if md.spec.rollout else None
    if analysis is not None and analysis.metrics:
        since = last if last is not None else progress.step_started
        waits.append(parse_duration(analysis.interval) - (now - since))
    step = steps[min(progress.step, len(steps) - 1)]
    if step.pause_seconds is not None:
        waits.append(step.pause_seconds - (now - progress.step_started))
    return max(0.2, min(waits))


def requested(md_body: dict[str, Any]) -> str | None:
    """The command in the annotation, if it is one we know."""
    value = (md_body["metadata"].get("annotations") or {}).get(COMMAND_ANNOTATION, "")
    return value if value in COMMANDS else None


def _command(md_body: dict[str, Any]) -> Command | None:
    value = requested(md_body)
    return cast(Command, value) if value not in (None, "retry") else None


def analyse(
    md: ModelDeployment, ctx: OperatorContext, now: float, last: float | None, not_before: float
) -> tuple[str | None, str, float | None, tuple[AnalysisResult, ...]]:
    """(result, message, time, per-metric results) of an analysis when one is due, else
    (None, "", last, ())."""
    analysis = md.spec.rollout.analysis if md.spec.rollout else None
    if analysis is None or not analysis.metrics:
        return None, "", last, ()
    interval = parse_duration(analysis.interval)
    if now - (last if last is not None else not_before) < interval:
        return None, "", last, ()  # the first check comes one interval in: there is data by then
    url = analysis.prometheus.url if analysis.prometheus else ctx.prometheus_url
    variables = {
        "selector": metric_selector(md),
        "interval": f"{max(int(interval), 1)}s",
        "namespace": md.metadata.namespace,
        "name": md.metadata.name,
    }
    measurements = []
    for metric in analysis.metrics:
        try:
            if not url:
                raise ProviderError("no Prometheus URL (spec.rollout.analysis.prometheus.url)")
            query = render_query(metric.query or BUILTIN_QUERIES[metric.builtin or ""], variables)
            value = ctx.metrics_provider(url).query(query)
            measurements.append(Measurement(metric.name, value, metric.min, metric.max))
        except (ProviderError, TemplateError, KeyError) as error:
            measurements.append(
                Measurement(metric.name, None, metric.min, metric.max, error=str(error))
            )
    result, decisive = verdict(measurements)
    results = tuple(
        AnalysisResult(
            name=m.name, value=m.value, min=m.min, max=m.max, result=assess(m), time=iso(now)
        )
        for m in measurements
    )
    return result, describe(decisive) if decisive else "all metrics within bounds", now, results


def run(
    md: ModelDeployment,
    md_body: dict[str, Any],
    revision: str,
    stable: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    ctx: OperatorContext,
    now: float,
) -> CanaryResult:
    """One round of the rollout of ``revision``."""
    ns = md.metadata.namespace
    steps = steps_of(md)
    previous = md.status.canary
    progress = (
        Progress(
            revision=revision,
            step=previous.step or 0,
            step_started=previous.step_started or now,
            failed_checks=previous.failed_checks or 0,
            passed_in_step=previous.passed_checks or 0,
            paused=bool(previous.paused),
        )
        if previous is not None and previous.revision == revision
        else Progress(revision=revision, step_started=now)
    )
    total = md.spec.desired_replicas()  # under autoscaling: minReplicas while the canary runs
    weight = steps[min(progress.step, len(steps) - 1)].weight
    canary = _scale_tracks(md, revision, ctx, total, weight, stable)
    canary_pods = [p for p in pods if p["metadata"].get("labels", {}).get(TRACK_LABEL) == "canary"]
    failure = next(
        (
            p.message
            for pod in canary_pods
            for p in pod_problems(pod)
            if p.reason in CANARY_FAILURES
        ),
        None,
    ) or stalled(canary)
    ready = int((canary or {}).get("status", {}).get("readyReplicas") or 0) >= canary_replicas(
        total, weight
    )
    last = (
        previous.last_analysis if previous is not None and previous.revision == revision else None
    )
    result, message, analysed, results = (
        analyse(md, ctx, now, last, not_before=progress.step_started)
        if ready
        else (None, "", last, ())
    )
    analysis_configured = bool(
        md.spec.rollout and md.spec.rollout.analysis and md.spec.rollout.analysis.metrics
    )
    decision = decide_step(
        progress,
        steps,
        Observation(
            now=now,
            canary_ready=ready,
            canary_failure=failure,
            analysis=cast(Any, result),
            analysis_message=message,
            analysis_configured=analysis_configured,
            failure_limit=md.spec.rollout.analysis.failure_limit
            if md.spec.rollout and md.spec.rollout.analysis
            else 2,
            command=_command(md_body),
        ),
    )
    if decision.action == "Advance":
        canary = _scale_tracks(md, revision, ctx, total, decision.weight, stable)
    stable_status = md.status.stable or TrackStatus()
    history = list(md.status.history)
    began = (
        previous.started if previous is not None and previous.revision == revision else None
    ) or now
    started = iso(began)
    entry = HistoryEntry(
        version=md.spec.model.version,
        revision=revision,
        result="",
        storage_uri=md.spec.model.storage_uri,
        image=md.spec.server.image,
        started=started,
        finished=iso(now),
        reason=decision.message,
    )
    if decision.action in ("Rollback", "Abort"):
        ctx.api.delete("apps/v1", "Deployment", ns, deployment_name(md, "canary"))
        ctx.api.merge_patch(
            "apps/v1",
            "Deployment/scale",
            ns,
            deployment_name(md, "stable"),
            {"spec": {"replicas": total}},
        )
        result_name = "Aborted" if decision.action == "Abort" else "RolledBack"
        view = RolloutView(
            stable=stable_status,
            rollback=RollbackStatus(
                revision=revision, reason=result_name, message=decision.message
            ),
            history=tuple(
                [*history, entry.model_copy(update={"result": result_name})][-HISTORY_LIMIT:]
            ),
        )
        return CanaryResult(view, None, decision, promote=False)
    if decision.action == "Promote":
        view = RolloutView(
            stable=TrackStatus(version=md.spec.model.version, revision=revision),
            analysis=results or tuple(md.status.analysis),
            history=tuple(
                [*history, entry.model_copy(update={"result": "Promoted"})][-HISTORY_LIMIT:]
            ),
        )
        return CanaryResult(view, canary, decision, promote=True)
    # Through a Gateway the route sets the split; by replicas, the ready pods do.
    achieved = decision.weight if gateway_routing(md) else _achieved_weight(stable, canary)
    after = decision.progress
    view = RolloutView(
        stable=stable_status,
        canary=TrackStatus(
            version=md.spec.model.version,
            revision=revision,
            weight=achieved,
            step=after.step,
            started=began,
            failed_checks=after.failed_checks,
            passed_checks=after.passed_in_step,
            step_started=after.step_started,
            last_analysis=analysed,
            paused=after.paused,
        ),
        history=tuple(history),
        analysis=results or tuple(md.status.analysis),
        message=f"canary step {after.step + 1}/{len(steps)}: {decision.message}",
    )
    wake = next_look(md, after, steps, now, analysed)
    return CanaryResult(view, canary, decision, promote=False, requeue_after=wake)


def stalled(deployment: dict[str, Any] | None) -> str | None:
    """The canary Deployment's ProgressDeadlineExceeded, as a failure message."""
    for condition in (deployment or {}).get("status", {}).get("conditions", []):
        if (
            condition.get("type") == "Progressing"
            and condition.get("reason") == "ProgressDeadlineExceeded"
        ):
            return f"ProgressDeadlineExceeded: {condition.get('message', '')}"
    return None


def _achieved_weight(stable: dict[str, Any] | None, canary: dict[str, Any] | None) -> int:
    def ready(deployment: dict[str, Any] | None) -> int:
        return int((deployment or {}).get("status", {}).get("readyReplicas") or 0)

    both = ready(stable) + ready(canary)
    return round(100 * ready(canary) / both) if both else 0


def _scale_tracks(
    md: ModelDeployment,
    revision: str,
    ctx: OperatorContext,
    total: int,
    weight: int,
    stable: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """Apply the canary Deployment with its share and scale ``stable`` (as reconcile read it)
    to the rest; returns the canary Deployment."""
    ns = md.metadata.namespace
    wanted = canary_replicas(total, weight)
    desired = build_deployment(md, "canary", revision, ctx.build, replicas=wanted)
    observed = ctx.api.get("apps/v1", "Deployment", ns, desired["metadata"]["name"])
    canary = ctx.api.apply(desired) if needs_apply(observed, desired) else observed
    if stable is not None and stable.get("spec", {}).get("replicas") != total - wanted:
        ctx.api.merge_patch(
            "apps/v1",
            "Deployment/scale",
            ns,
            deployment_name(md, "stable"),
            {"spec": {"replicas": total - wanted}},
        )
    return canary
