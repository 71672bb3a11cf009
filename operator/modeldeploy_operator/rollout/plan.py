"""Rollouts, planned: pure functions from one snapshot of a ModelDeployment's world to what
its Deployments and its status should be.

A new revision of a ModelDeployment whose promoted revision is another runs, with
``spec.rollout.strategy: Canary``, as ``<name>-canary`` beside ``<name>-stable``. The Service
selects both tracks, so traffic splits by the ratio of ready pods. :func:`plan_rollout` makes
one decision per pass (:func:`~modeldeploy_operator.rollout.decide.decide_step`), shapes the
status that records it, and derives the Deployments' targets from that *new* status
(:func:`targets`), so the reconciler can write the status first and carry it out after: an
operator stopped or refused in between redoes the same thing, never the old one.

Capacity, like a Deployment's rolling update with ``ModelDeploymentSpec.surge`` (one extra
pod, or what ``maxSurgeGPUs`` allows): stable shrinks only by as many pods as the canary has
Ready at the new revision, and the canary grows only within the surge. So the pods that
serve never number fewer than the spec asks for; with no surge budget
(``maxSurgeGPUs`` below one replica's GPUs) one pod may be missing while pods swap, the
documented trade. Promotion rolls stable to the new revision while the canary keeps serving,
and removes canary pods only as new stable pods become Ready. A rollback or an abort removes
the canary at once: stopping a bad version's answers comes before capacity.

Manual control: the annotation ``serving.modeldeploy.io/command`` (promote, abort, pause,
resume, rollback; retry for a held revision), consumed once acted on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from modeldeploy_operator.api.v1alpha1 import (
    GROUP,
    AnalysisResult,
    HistoryEntry,
    ModelDeployment,
    RollbackStatus,
    TrackStatus,
    parse_duration,
)
from modeldeploy_operator.builders.deployment import SERVING_GATE
from modeldeploy_operator.builders.labels import REVISION_LABEL, TRACK_LABEL, Track
from modeldeploy_operator.builders.route import gateway_routing
from modeldeploy_operator.rollout.analysis import Measurement, Result, describe, verdict
from modeldeploy_operator.rollout.decide import (
    Command,
    Decision,
    Observation,
    Progress,
    Step,
    decide_step,
    step_replicas,
)
from modeldeploy_operator.status import (
    RolloutView,
    dig,
    fetch_report,
    is_terminating,
    pod_problems,
    pod_ready,
)

COMMAND_ANNOTATION = f"{GROUP}/command"
COMMANDS = ("promote", "abort", "pause", "resume", "rollback", "retry")
CANARY_FAILURES = {
    "ImagePullBackOff",
    "ModelFetchFailed",
    "ModelLoadFailed",
    "CrashLoopBackOff",
    "ContainerConfigError",
}
HISTORY_LIMIT = 10

Mode = Literal["rolling", "canary", "held"]
NO_STEP = Step(weight=0)


@dataclass(frozen=True)
class TrackState:
    """One track's Deployment and pods, as observed."""

    exists: bool = False
    revision: str | None = None  # of its pod template
    replicas: int = 0  # spec.replicas
    ready: int = 0  # Ready pods of ``revision`` that are not going away
    rolled: bool = False  # every replica at ``revision`` and available, no older pod left
    failure: str | None = None  # why its pods cannot serve, when they cannot
    digest: str | None = None  # the content its Ready pods' fetchers reported, when one
    # Behind the serving gate (shadow steps): pods of ``revision`` whose containers are all
    # ready, their addresses, and the pods (of any revision) the gate still holds.
    loaded: int = 0
    addresses: tuple[str, ...] = ()
    gated: tuple[str, ...] = ()


@dataclass(frozen=True)
class Check:
    """One analysis, measured this pass."""

    result: Result
    message: str
    results: tuple[AnalysisResult, ...]
    time: float


@dataclass(frozen=True)
class World:
    """What one pass saw of a ModelDeployment's rollout."""

    stable: TrackState
    canary: TrackState
    command: str | None = None  # the command annotation, when it names one we know
    check: Check | None = None  # the analysis, when one was due


@dataclass(frozen=True)
class Targets:
    """What the Deployments should be. ``apply`` builds one from the spec (at the revision
    being rolled out), ``scale`` keeps its template and sets replicas, ``absent`` leaves a
    missing stable missing (its promoted spec is not at hand), ``delete`` removes the canary."""

    stable: Literal["apply", "scale", "absent"]
    stable_replicas: int
    canary: Literal["apply", "scale", "delete"]
    canary_replicas: int = 0


@dataclass(frozen=True)
class Shadowing:
    """A shadow step in progress: what ``<name>-shadow`` tells stable's sidecars."""

    revision: str
    version: str
    percent: int
    targets: tuple[str, ...]  # the canary pods' addresses


@dataclass(frozen=True)
class RolloutPlan:
    mode: Mode
    view: RolloutView
    targets: Targets
    decision: Decision | None = None
    requeue_after: float | None = None  # when the rollout next needs a look by itself
    shadow: Shadowing | None = None
    admit: tuple[str, ...] = ()  # canary pods to open the serving gate of


def stalled(deployment: Mapping[str, Any] | None) -> str | None:
    """A Deployment's ProgressDeadlineExceeded, as a failure message."""
    for condition in dig(deployment, "status", "conditions") or []:
        if (
            condition.get("type") == "Progressing"
            and condition.get("reason") == "ProgressDeadlineExceeded"
        ):
            return f"ProgressDeadlineExceeded: {condition.get('message', '')}"
    return None


def track_state(
    deployment: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]], track: Track
) -> TrackState:
    """A track's Deployment and its pods as plain facts."""
    if deployment is None:
        return TrackState()
    revision = dig(deployment, "spec", "template", "metadata", "labels", REVISION_LABEL)
    mine = [
        p
        for p in pods
        if (dig(p, "metadata", "labels") or {}).get(TRACK_LABEL) == track
        and (dig(p, "metadata", "labels") or {}).get(REVISION_LABEL) == revision
        and not is_terminating(p)
    ]
    replicas = int(dig(deployment, "spec", "replicas") or 0)
    status = dig(deployment, "status") or {}
    rolled = (
        status.get("observedGeneration") == dig(deployment, "metadata", "generation")
        and int(status.get("updatedReplicas") or 0) == replicas
        and int(status.get("availableReplicas") or 0) >= replicas
        and int(status.get("replicas") or 0) == replicas
    )
    failure = next(
        (p.message for pod in mine for p in pod_problems(pod) if p.reason in CANARY_FAILURES),
        None,
    ) or stalled(deployment)
    # Ready pods of this revision, but no more than the Deployment reports available: the
    # pods say it first, and status (what users see) must not dip while pods swap.
    available = int(status.get("availableReplicas") or 0)
    digests = {(fetch_report(p) or {}).get("digest") for p in mine if pod_ready(p)} - {None}
    loaded = [p for p in mine if containers_ready(p)]
    if len(loaded) >= replicas:
        # Every pod is up, behind the serving gate (a shadow step): the Deployment counts no
        # progress while they are not Ready, which is not a failure of theirs.
        failure = next(
            (p.message for pod in mine for p in pod_problems(pod) if p.reason in CANARY_FAILURES),
            None,
        )
    return TrackState(
        exists=True,
        revision=revision,
        replicas=replicas,
        ready=min(available, sum(1 for p in mine if pod_ready(p))),
        rolled=rolled,
        failure=failure,
        # One digest when the pods agree; a tag that moved mid-rollout gives two: none shown.
        digest=str(next(iter(digests))) if len(digests) == 1 else None,
        loaded=len(loaded),
        addresses=tuple(
            sorted(str(ip) for p in loaded if (ip := dig(p, "status", "podIP")) is not None)
        ),
        gated=tuple(
            sorted(
                str(dig(p, "metadata", "name"))
                for p in pods
                if (dig(p, "metadata", "labels") or {}).get(TRACK_LABEL) == track
                and gate_closed(p)
                and not is_terminating(p)
            )
        ),
    )


def containers_ready(pod: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "ContainersReady" and c.get("status") == "True"
        for c in dig(pod, "status", "conditions") or []
    )


def gate_closed(pod: Mapping[str, Any]) -> bool:
    """The pod waits on the serving gate: its spec has it, its status does not say True."""
    gates = dig(pod, "spec", "readinessGates") or []
    if not any(g.get("conditionType") == SERVING_GATE for g in gates):
        return False
    return not any(
        c.get("type") == SERVING_GATE and c.get("status") == "True"
        for c in dig(pod, "status", "conditions") or []
    )


def steps_of(md: ModelDeployment) -> tuple[Step, ...]:
    rollout = md.spec.rollout
    steps = [
        Step(
            weight=s.weight or 0,
            pause_seconds=None if s.pause in (None, "manual") else parse_duration(s.pause),
            manual=s.pause == "manual",
            shadow=s.shadow.percent if s.shadow else 0,
        )
        for s in (rollout.steps if rollout else [])
    ]
    return tuple(steps) or (Step(weight=100),)


def requested(annotations: Mapping[str, str] | None) -> str | None:
    """The command in the annotation, if it is one we know."""
    value = (annotations or {}).get(COMMAND_ANNOTATION, "")
    return value if value in COMMANDS else None


def mode(md: ModelDeployment, revision: str, command: str | None = None) -> Mode:
    """``rolling`` (apply the spec to stable), ``canary`` (a rollout runs) or ``held`` (this
    revision failed its rollout: stable keeps the promoted one; ``retry`` starts it over).

    A canary runs whenever another revision has been promoted, whatever the phase: after a
    rollback, during a scale-up or with a pod Pending, a new revision is still judged. Before
    anything was promoted (``status.stable`` is set once the first revision has fully rolled
    out) there is nothing to compare with, and the spec rolls out directly.
    """
    status = md.status
    if status.rollback is not None and status.rollback.revision == revision:
        return "canary" if command == "retry" else "held"
    rollout = md.spec.rollout
    promoted = status.stable.revision if status.stable else None
    if rollout is None or rollout.strategy != "Canary" or promoted in (None, revision):
        return "rolling"
    return "canary"


def _interval(md: ModelDeployment) -> float | None:
    analysis = md.spec.rollout.analysis if md.spec.rollout else None
    if analysis is None or not analysis.metrics:
        return None
    return parse_duration(analysis.interval)


def _progress(md: ModelDeployment, revision: str, now: float) -> Progress:
    previous = md.status.canary
    if previous is None or previous.revision != revision:
        return Progress(revision=revision, step_started=now)
    return Progress(
        revision=revision,
        step=previous.step or 0,
        step_started=previous.step_started or now,
        failed_checks=previous.failed_checks or 0,
        inconclusive_checks=previous.inconclusive_checks or 0,
        passed_in_step=previous.passed_checks or 0,
        paused=bool(previous.paused),
        ready_since=previous.ready_since,
    )


def step_ready(md: ModelDeployment, revision: str, world: World) -> bool:
    """The current step's canary pods are all Ready at ``revision`` (in a shadow step, all
    loaded: they stay behind the serving gate)."""
    steps = steps_of(md)
    step = steps[min(_progress(md, revision, 0.0).step, len(steps) - 1)]
    wanted = step_replicas(md.spec.desired_replicas(), step)
    ready = world.canary.loaded if step.shadow else world.canary.ready
    return world.canary.revision == revision and ready >= wanted


def in_shadow_step(md: ModelDeployment, revision: str) -> bool:
    """The rollout of ``revision`` is in a shadow step (as ``status.canary`` records it)."""
    steps = steps_of(md)
    return bool(steps[min(_progress(md, revision, 0.0).step, len(steps) - 1)].shadow)


def analysis_due(md: ModelDeployment, revision: str, world: World, now: float) -> bool:
    """An analysis is due once per interval while the step's canary pods are Ready, the first
    one interval after they became Ready: there is data about them by then."""
    interval = _interval(md)
    if interval is None or mode(md, revision, world.command) != "canary":
        return False
    progress = _progress(md, revision, now)
    if progress.ready_since is None or not step_ready(md, revision, world):
        return False
    last = md.status.canary.last_analysis if md.status.canary else None
    return now - max(progress.ready_since, last or 0.0) >= interval


def targets(md: ModelDeployment, revision: str, how: Mode, step: Step, world: World) -> Targets:
    """The Deployments' replicas for a mode and a canary step; see the module's capacity
    rule. Never fewer ready pods than the spec's count while pods swap (with a surge budget).
    A shadow step's canary pods serve nobody: stable keeps every replica, and the canary
    runs beside it within the surge (one pod at least).

    A canary of another revision than the one rolling out (promoted, or overtaken by a newer
    spec) is retired first, pod by pod as stable pods become Ready; a rolled-back or aborted
    one goes at once."""
    total = md.spec.desired_replicas()
    extra, missing = md.spec.surge()
    stable_kind: Literal["apply", "scale", "absent"] = "scale" if world.stable.exists else "absent"
    if how == "rolling":
        stable_kind = "apply"
    canary = world.canary
    if how == "held" or (not canary.exists and how == "rolling"):
        return Targets(stable_kind, total, "delete")
    if how == "rolling" or (canary.revision != revision and canary.exists):
        # Stable pods that serve what stable will be: the new revision once promoted.
        current = how == "canary" or world.stable.revision == revision
        stable_ready = world.stable.ready if current else 0
        keep = min(canary.replicas, max(0, total - missing - stable_ready))
        stable = max(0, min(total, total + extra - keep))
        return Targets(stable_kind, stable, "scale" if keep else "delete", keep)
    wanted = step_replicas(total, step)
    if step.shadow:
        return Targets(stable_kind, total, "apply", max(1, min(wanted, extra)))
    stable = max(0, total - wanted, total - missing - canary.ready)
    return Targets(stable_kind, stable, "apply", min(wanted, max(0, total + extra - stable)))


def iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def next_look(
    md: ModelDeployment, progress: Progress, steps: tuple[Step, ...], now: float, last: float | None
) -> float:
    """Seconds until something changes by itself: the next analysis or the end of a pause.
    Watch events cover the rest (pods becoming ready); at most a few seconds, as a floor."""
    waits = [5.0]
    interval = _interval(md)
    if progress.ready_since is not None:
        if interval is not None:
            waits.append(interval - (now - max(progress.ready_since, last or 0.0)))
        step = steps[min(progress.step, len(steps) - 1)]
        if step.pause_seconds is not None:
            waits.append(step.pause_seconds - (now - progress.ready_since))
    return max(0.2, min(waits))


def _digest(track: TrackState, recorded: TrackStatus | None) -> str | None:
    """What a track serves: its pods' report, else what status recorded for that revision."""
    if track.digest is not None:
        return track.digest
    if recorded is not None and recorded.revision == track.revision:
        return recorded.digest
    return None


def plan_rollout(md: ModelDeployment, revision: str, world: World, now: float) -> RolloutPlan:
    """This pass's rollout decision, the status that records it, and the Deployments' targets
    derived from that status."""
    how = mode(md, revision, world.command)
    if how == "canary":
        return _plan_canary(md, revision, world, now)
    status = md.status
    if how == "held":
        view = RolloutView(
            stable=status.stable, rollback=status.rollback, history=tuple(status.history)
        )
        return RolloutPlan(how, view, targets(md, revision, how, NO_STEP, world))
    plan = targets(md, revision, how, NO_STEP, world)
    rolled = world.stable.rolled and world.stable.revision == revision
    stable = TrackStatus(
        version=md.spec.model.version,
        revision=revision,
        digest=_digest(world.stable, status.stable),
    )
    view = RolloutView(
        stable=stable if rolled else status.stable,
        history=tuple(status.history),
        analysis=tuple(status.analysis) if plan.canary == "scale" else (),
    )
    if plan.canary == "scale":
        ready = world.stable.ready if world.stable.revision == revision else 0
        total = md.spec.desired_replicas()
        view = RolloutView(
            stable=view.stable,
            history=view.history,
            analysis=view.analysis,
            reason="Promoting",
            message=f"promoting revision {revision}: {ready}/{total} new stable pods Ready;"
            f" {plan.canary_replicas} canary pods serve until they are",
        )
        return RolloutPlan(how, view, plan, admit=_admit(world, revision))
    return RolloutPlan(how, view, plan)


def _plan_canary(md: ModelDeployment, revision: str, world: World, now: float) -> RolloutPlan:
    steps = steps_of(md)
    status = md.status
    progress = _progress(md, revision, now)
    rollout = md.spec.rollout
    analysis = rollout.analysis if rollout else None
    ready = step_ready(md, revision, world)
    check = world.check if ready else None
    failure = world.canary.failure if world.canary.revision == revision else None
    command = world.command if world.command not in (None, "retry") else None
    decision = decide_step(
        progress,
        steps,
        Observation(
            now=now,
            canary_ready=ready,
            canary_failure=failure,
            analysis=check.result if check else None,
            analysis_message=check.message if check else "",
            analysis_configured=_interval(md) is not None,
            failure_limit=analysis.failure_limit if analysis else 2,
            inconclusive_limit=analysis.inconclusive_limit if analysis else 0,
            on_inconclusive=analysis.on_inconclusive if analysis else "Pause",
            command=cast(Command | None, command),
            stable_missing=not world.stable.exists,
            **_latest(status.analysis if previous_step(md, revision) else ()),
        ),
    )
    previous = status.canary if status.canary and status.canary.revision == revision else None
    began = (previous.started if previous else None) or now
    digest = world.canary.digest if world.canary.revision == revision else None
    digest = digest or (previous.digest if previous else None)
    entry = HistoryEntry(
        version=md.spec.model.version,
        revision=revision,
        result="",
        storage_uri=md.spec.model.storage_uri,
        digest=digest,
        image=md.spec.server.image,
        started=iso(began),
        finished=iso(now),
        reason=decision.message,
    )
    history = list(status.history)
    results = check.results if check else tuple(status.analysis)
    if decision.action in ("Rollback", "Abort"):
        result = "Aborted" if decision.action == "Abort" else "RolledBack"
        view = RolloutView(
            stable=status.stable,
            rollback=RollbackStatus(revision=revision, reason=result, message=decision.message),
            history=tuple([*history, entry.model_copy(update={"result": result})][-HISTORY_LIMIT:]),
            analysis=results,
        )
        return RolloutPlan("held", view, targets(md, revision, "held", NO_STEP, world), decision)
    if decision.action == "Promote":
        view = RolloutView(
            stable=TrackStatus(version=md.spec.model.version, revision=revision, digest=digest),
            history=tuple(
                [*history, entry.model_copy(update={"result": "Promoted"})][-HISTORY_LIMIT:]
            ),
            analysis=results,
        )
        promoted = targets(md, revision, "rolling", NO_STEP, world)
        return RolloutPlan(
            "rolling", view, promoted, decision, requeue_after=1.0, admit=_admit(world, revision)
        )
    after = decision.progress
    step = steps[min(after.step, len(steps) - 1)]
    plan = targets(md, revision, "canary", step, world)
    shadow = None
    if step.shadow:
        shadow = Shadowing(
            revision,
            md.spec.model.version,
            step.shadow,
            world.canary.addresses if world.canary.revision == revision else (),
        )
    # Through a Gateway the route sets the split; by replicas, the ready pods do.
    achieved = decision.weight if gateway_routing(md) else _achieved(world, revision)
    last = check.time if check else (previous.last_analysis if previous else None)
    view = RolloutView(
        stable=status.stable,
        canary=TrackStatus(
            version=md.spec.model.version,
            revision=revision,
            digest=digest,
            weight=achieved,
            shadow=step.shadow or None,
            step=after.step,
            started=began,
            failed_checks=after.failed_checks,
            inconclusive_checks=after.inconclusive_checks or None,
            passed_checks=after.passed_in_step,
            step_started=after.step_started,
            ready_since=after.ready_since,
            last_analysis=last,
            paused=after.paused,
        ),
        history=tuple(history),
        analysis=results,
        message=f"canary step {after.step + 1}/{len(steps)}: {decision.message}",
        reason=decision.reason if decision.action == "Wait" else "Canary",
    )
    wake = next_look(md, after, steps, now, last)
    admit = () if step.shadow else _admit(world, revision)
    return RolloutPlan(
        "canary", view, plan, decision, requeue_after=wake, shadow=shadow, admit=admit
    )


def _admit(world: World, revision: str) -> tuple[str, ...]:
    """The canary pods to let serve once the rollout is past its shadow steps: those of the
    revision rolling out, never a superseded one's (judged by nobody)."""
    return world.canary.gated if world.canary.revision == revision else ()


def previous_step(md: ModelDeployment, revision: str) -> bool:
    """``status.analysis`` is about this rollout (not an earlier one)."""
    canary = md.status.canary
    return canary is not None and canary.revision == revision


def _latest(results: Sequence[AnalysisResult]) -> dict[str, Any]:
    """The verdict of the last check, as recorded in ``status.analysis``."""
    if not results:
        return {}
    measured = [
        Measurement(r.name, r.value if r.result != "Inconclusive" else None, r.min, r.max)
        for r in results
    ]
    result, decisive = verdict(measured)
    return {"latest": result, "latest_message": describe(decisive) if decisive else ""}


def _achieved(world: World, revision: str) -> int:
    canary = world.canary.ready if world.canary.revision == revision else 0
    both = world.stable.ready + canary
    return round(100 * canary / both) if both else 0
