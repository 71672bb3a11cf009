"""What is true about a ModelDeployment, decided from what was observed: pure functions.

:func:`compute_status` turns observations (the child Deployment, the pods, the nodes' GPU
products, missing Secrets, an apply error) into ``status``: phase, counts and the conditions
``Ready``, ``Progressing`` and ``Degraded``. :func:`transition_events` says which Events a
change of status deserves, so Events are emitted on transitions only.

Ready means "serving at the desired capacity": it stays True during a rollout that keeps
capacity (KServe's Ready flips to Unknown there, kserve#5443) and is independent of
Degraded, which says that something needs a human.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from modeldeploy_operator.api.v1alpha1 import (
    ActivationStatus,
    AnalysisResult,
    AutoscalingStatus,
    Condition,
    ConditionStatus,
    HistoryEntry,
    ModelDeployment,
    ModelDeploymentStatus,
    Phase,
    RollbackStatus,
    TrackStatus,
    parse_duration,
)
from modeldeploy_operator.builders.labels import selector_string

FETCH_CONTAINER = "fetch-model"
TRITON_CONTAINER = "triton"
# Triton's log lines that name why a model did not load ("failed to load 'm' version 1: ...").
LOAD_FAILURE_MARKERS = ("failed to load", "UNAVAILABLE:", "error: creating server")
IMAGE_PULL_REASONS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_ERROR_REASONS = {"CreateContainerConfigError", "CreateContainerError"}

# Problems, most fundamental first: the first one found names Ready's and Degraded's reason.
PROBLEM_ORDER = (
    "ApplyFailed",
    "GPUProductNotFound",
    "SecretNotFound",
    "ConfigMapNotFound",
    "InsufficientGPU",
    "Unschedulable",
    "ImagePullBackOff",
    "ModelFetchFailed",
    "ModelLoadFailed",
    "ContainerConfigError",
    "CrashLoopBackOff",
    "ReplicaFailure",
    "ProgressDeadlineExceeded",
    "RolledBack",
    "Aborted",
)


@dataclass(frozen=True)
class MissingReference:
    """A Secret or ConfigMap the spec names that does not exist."""

    kind: str
    name: str
    field: str


@dataclass(frozen=True)
class RolloutView:
    """What the rollout planner decided this round, for status to report."""

    stable: TrackStatus | None  # None until a first revision has fully rolled out
    canary: TrackStatus | None = None
    rollback: RollbackStatus | None = None
    history: tuple[HistoryEntry, ...] = ()
    analysis: tuple[AnalysisResult, ...] = ()  # the last check, per metric
    message: str = ""  # the step or the promotion, for the Progressing condition
    reason: str = "Canary"  # the Progressing condition's reason while ``message`` is set


@dataclass(frozen=True)
class Observed:
    """Everything reconcile saw, as plain data."""

    deployment: Mapping[str, Any] | None = None
    canary_deployment: Mapping[str, Any] | None = None
    rollout: RolloutView | None = None
    pods: Sequence[Mapping[str, Any]] = ()
    gpu_products: frozenset[str] | None = None  # None: nodes could not be listed
    missing: tuple[MissingReference, ...] = ()
    apply_error: str | None = None
    autoscaling: AutoscalingStatus | None = None  # the autoscaler's view, when it scales
    at_gpu_capacity: str | None = None  # why the autoscaler stopped short, when it did
    activation: ActivationView | None = None  # with scale to zero: the activator's part


@dataclass(frozen=True)
class ActivationView:
    """What the scale-from-zero plan found (autoscaling/activation.py)."""

    status: ActivationStatus | None = None  # status.activation
    configured: bool = False  # an activator with Ready pods is there


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str


@dataclass(frozen=True)
class EventSpec:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Counts:
    desired: int
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    available: int = 0
    current: bool = False  # the Deployment controller has seen the Deployment's latest spec
    running_pods: int = 0
    fetching_pods: int = 0
    warm: int = 0  # pods whose fetcher found the whole model in the node cache


def dig(obj: Mapping[str, Any] | None, *path: str) -> Any:
    """The value at ``path`` in nested mappings; None where the path breaks off."""
    node: Any = obj
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def is_terminating(pod: Mapping[str, Any]) -> bool:
    return dig(pod, "metadata", "deletionTimestamp") is not None


def _field(deployments: Sequence[Mapping[str, Any] | None], name: str) -> int:
    return sum(int((dig(d, "status") or {}).get(name) or 0) for d in deployments)


def _current(deployment: Mapping[str, Any] | None) -> bool:
    status = dig(deployment, "status") or {}
    return bool(status.get("observedGeneration") == dig(deployment, "metadata", "generation"))


def count(md: ModelDeployment, observed: Observed) -> Counts:
    dep = observed.deployment
    both = [dep, observed.canary_deployment]
    pods = [p for p in observed.pods if not is_terminating(p)]
    return Counts(
        # What the spec asks for, also while a rollout runs extra pods beside it.
        desired=md.spec.desired_replicas(),
        replicas=_field(both, "replicas"),
        ready=_field(both, "readyReplicas"),
        updated=_field([dep], "updatedReplicas") + _field([observed.canary_deployment], "replicas"),
        available=_field(both, "availableReplicas"),
        current=dep is not None
        and _current(dep)
        and (observed.canary_deployment is None or _current(observed.canary_deployment)),
        running_pods=sum(1 for p in pods if dig(p, "status", "phase") == "Running"),
        fetching_pods=sum(1 for p in pods if _first_fetch(p)),
        warm=sum(1 for p in pods if (fetch_report(p) or {}).get("warm") is True),
    )


def pod_ready(pod: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in dig(pod, "status", "conditions") or []
    )


def fetch_report(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the pod's fetcher reported when it succeeded (its termination message): the
    digest it served, and whether the node cache held the model."""
    done = _init_state(pod, "terminated") or {}
    if done.get("exitCode") != 0:
        return None
    try:
        report = json.loads(done.get("message") or "")
    except ValueError:  # an older runtime, which printed nothing there
        return None
    return report if isinstance(report, dict) else None


def _first_fetch(pod: Mapping[str, Any]) -> bool:
    """The pod's fetcher runs and has not failed before (a retry is a failure, see
    pod_problems)."""
    for status in dig(pod, "status", "initContainerStatuses") or []:
        if status.get("name") == FETCH_CONTAINER:
            failed = dig(status, "lastState", "terminated", "exitCode") not in (None, 0)
            return dig(status, "state", "running") is not None and not failed
    return False


def _init_state(pod: Mapping[str, Any], state: str) -> Any:
    for status in dig(pod, "status", "initContainerStatuses") or []:
        if status.get("name") == FETCH_CONTAINER:
            return dig(status, "state", state)
    return None


def pod_problems(pod: Mapping[str, Any]) -> list[Problem]:
    found: list[Problem] = []
    name = dig(pod, "metadata", "name")
    for condition in dig(pod, "status", "conditions") or []:
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            message = condition.get("message", "")
            reason = (
                "InsufficientGPU" if "Insufficient nvidia.com/gpu" in message else "Unschedulable"
            )
            found.append(Problem(reason, f"pod {name} cannot be scheduled: {message}"))
    for status in dig(pod, "status", "initContainerStatuses") or []:
        if status.get("name") != FETCH_CONTAINER:
            continue
        waiting = dig(status, "state", "waiting") or {}
        terminated = dig(status, "state", "terminated") or {}
        last = dig(status, "lastState", "terminated") or {}
        if waiting.get("reason") in IMAGE_PULL_REASONS:
            found.append(Problem("ImagePullBackOff", f"pod {name}: {waiting.get('message', '')}"))
        # A fetcher that failed before is still failing while it runs again: the status
        # holds through the kubelet's retries (no Degraded/Progressing flip, and no write, at
        # every restart), until an attempt succeeds.
        elif (terminated or last).get("exitCode", 0) != 0 or waiting.get(
            "reason"
        ) == "CrashLoopBackOff":
            detail = (terminated or last).get("message") or (terminated or last).get("reason", "")
            code = (terminated or last).get("exitCode", "?")
            found.append(
                Problem(
                    "ModelFetchFailed",
                    f"pod {name}: fetching the model failed (exit code {code}): {detail}".rstrip(),
                )
            )
    for status in dig(pod, "status", "containerStatuses") or []:
        waiting = dig(status, "state", "waiting") or {}
        waiting_reason = waiting.get("reason")
        container = status.get("name")
        load_failure = model_load_failure(status, name) if container == TRITON_CONTAINER else None
        if load_failure is not None:
            found.append(Problem("ModelLoadFailed", f"pod {name}: {load_failure}"))
        elif waiting_reason in IMAGE_PULL_REASONS:
            found.append(
                Problem(
                    "ImagePullBackOff",
                    f"pod {name}, container {container}: {waiting.get('message', waiting_reason)}",
                )
            )
        elif waiting_reason in CONFIG_ERROR_REASONS:
            found.append(
                Problem(
                    "ContainerConfigError",
                    f"pod {name}, container {container}: {waiting.get('message', waiting_reason)}",
                )
            )
        elif waiting_reason == "CrashLoopBackOff":
            found.append(
                Problem("CrashLoopBackOff", f"pod {name}, container {container} keeps crashing")
            )
    return found


def model_load_failure(container_status: Mapping[str, Any], pod: str) -> str | None:
    """Why Triton exited, when it exited because a model did not load.

    The triton container's ``FallbackToLogsOnError`` puts the end of its log (the kubelet
    keeps 2 KiB) into the termination message; the lines that name the failed model are the
    cause. Triton prints its wide options table after the model table, so the model's own
    line is often cut off: then the message says where the whole log is.
    """
    terminated = (
        dig(container_status, "state", "terminated")
        or dig(container_status, "lastState", "terminated")
        or {}
    )
    if not terminated or terminated.get("exitCode", 0) == 0:
        return None
    lines = [
        line.strip().strip("|").strip()
        for line in str(terminated.get("message", "")).splitlines()
        if any(marker in line for marker in LOAD_FAILURE_MARKERS)
    ]
    if not lines:
        return None
    cause = "; ".join(dict.fromkeys(lines))
    if not any("failed to load '" in line or "UNAVAILABLE:" in line for line in lines):
        cause += f" (the model's own error: kubectl logs {pod} -c {TRITON_CONTAINER} --previous)"
    return f"Triton could not load the model (exit code {terminated['exitCode']}): {cause}"[:1024]


def find_problems(md: ModelDeployment, observed: Observed) -> list[Problem]:
    """Everything that keeps the ModelDeployment from reaching or keeping its desired state."""
    found: list[Problem] = []
    if observed.apply_error:
        found.append(Problem("ApplyFailed", observed.apply_error))
    gpu = md.spec.resources.gpu
    if (
        gpu
        and gpu.product
        and observed.gpu_products is not None
        and gpu.product not in observed.gpu_products
    ):
        known = ", ".join(sorted(observed.gpu_products)) or "none"
        found.append(
            Problem(
                "GPUProductNotFound",
                f"no node has nvidia.com/gpu.product={gpu.product}"
                f" (spec.resources.gpu.product); products in the cluster: {known}",
            )
        )
    found.extend(
        Problem(
            f"{ref.kind}NotFound",
            f"{ref.kind} {md.metadata.namespace}/{ref.name} ({ref.field}) not found",
        )
        for ref in observed.missing
    )
    for pod in observed.pods:
        if not is_terminating(pod):
            found.extend(pod_problems(pod))
    rollout = observed.rollout
    if rollout is not None and rollout.rollback is not None:
        rolled = rollout.rollback
        verb = "aborted" if rolled.reason == "Aborted" else "rolled back"
        found.append(
            Problem(
                rolled.reason,
                f"revision {rolled.revision} was {verb}: {rolled.message};"
                " stable keeps serving; change the spec to try again",
            )
        )
    for condition in dig(observed.deployment, "status", "conditions") or []:
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            found.append(Problem("ReplicaFailure", condition.get("message", "")))
        if (
            condition.get("type") == "Progressing"
            and condition.get("reason") == "ProgressDeadlineExceeded"
        ):
            found.append(Problem("ProgressDeadlineExceeded", condition.get("message", "")))
    return sorted(found, key=lambda p: PROBLEM_ORDER.index(p.reason))


def summarize(problems: Sequence[Problem]) -> str:
    """The first problem of each kind, with how many more there are."""
    lines: list[str] = []
    for reason in dict.fromkeys(p.reason for p in problems):
        same = [p for p in problems if p.reason == reason]
        more = f" (and {len(same) - 1} more)" if len(same) > 1 else ""
        lines.append(f"{same[0].message}{more}")
    return "; ".join(lines)


def decide_phase(
    counts: Counts, problems: Sequence[Problem], has_deployment: bool, canary: bool = False
) -> Phase:
    if any(p.reason == "ApplyFailed" for p in problems) and not has_deployment:
        return "Failed"  # nothing runs: the API server refused what the spec asks for
    if problems:
        return "Degraded"
    if not has_deployment:
        return "Pending"
    complete = (
        not canary
        and counts.current
        and counts.updated >= counts.desired
        and counts.available >= counts.desired
        and counts.replicas == counts.desired
    )
    if complete:
        return "Available"
    if counts.running_pods == 0 and counts.available == 0:
        return "Pending"
    return "Progressing"


def _progressing(
    counts: Counts,
    problems: Sequence[Problem],
    phase: Phase,
    canary_message: str,
    canary_reason: str = "Canary",
) -> tuple[str, ConditionStatus, str, str]:
    primary = problems[0] if problems else None
    progress_text = f"{counts.updated}/{counts.desired} replicas updated, {counts.ready} ready"
    if phase == "Available":
        return ("Progressing", "False", "RolloutComplete", progress_text)
    if phase == "Failed" and primary is not None:
        return ("Progressing", "False", primary.reason, primary.message)
    if any(p.reason == "ProgressDeadlineExceeded" for p in problems):
        return ("Progressing", "False", "ProgressDeadlineExceeded", progress_text)
    if canary_message:
        return ("Progressing", "True", canary_reason, canary_message)
    if counts.fetching_pods:
        return ("Progressing", "True", "FetchingModel", progress_text)
    return ("Progressing", "True", "RollingOut", progress_text)


def decide_conditions(
    counts: Counts,
    problems: Sequence[Problem],
    phase: Phase,
    canary_message: str = "",
    canary_reason: str = "Canary",
) -> list[tuple[str, ConditionStatus, str, str]]:
    """(type, status, reason, message) of Ready, Progressing and Degraded."""
    primary = problems[0] if problems else None
    ready_text = f"{counts.available}/{counts.desired} replicas available"
    if counts.desired > 0 and counts.available >= counts.desired:
        ready = ("Ready", "True", "ReplicasAvailable", ready_text)
    elif counts.desired == 0:
        ready = ("Ready", "False", "ScaledToZero", "spec asks for 0 replicas")
    elif primary is not None:
        ready = ("Ready", "False", primary.reason, f"{ready_text}: {primary.message}")
    elif counts.fetching_pods:
        ready = ("Ready", "False", "FetchingModel", f"{ready_text}: fetching the model")
    else:
        ready = ("Ready", "False", "ReplicasUnavailable", ready_text)

    progressing = _progressing(counts, problems, phase, canary_message, canary_reason)

    if primary is not None:
        degraded = ("Degraded", "True", primary.reason, summarize(problems))
    else:
        degraded = ("Degraded", "False", "AsExpected", "no problems found")
    return [ready, progressing, degraded]  # type: ignore[list-item]


def scaling_condition(
    scaling: AutoscalingStatus | None,
) -> tuple[str, ConditionStatus, str, str]:
    """ScalingActive, as the HPA reports it: False when the autoscaler cannot act (no
    metrics source); the model still serves at its replica count, so it is not Degraded."""
    if scaling is not None and scaling.reason == "NoMetricsSource":
        return ("ScalingActive", "False", "NoMetricsSource", f"spec.autoscaling: {scaling.message}")
    return ("ScalingActive", "True", "ValidMetricsSource", "the autoscaler can read its metrics")


WAKING = ("Waking", "WakeTimedOut")


def seconds_between(earlier: str | None, later: str) -> float | None:
    """Seconds from one status timestamp to another (None without the first)."""
    if not earlier:
        return None
    start = datetime.datetime.fromisoformat(earlier)
    return (datetime.datetime.fromisoformat(later) - start).total_seconds()


def zero_condition(
    md: ModelDeployment,
    counts: Counts,
    problems: Sequence[Problem],
    view: ActivationView | None,
    now: str,
) -> tuple[str, ConditionStatus, str, str] | None:
    """ScaledToZero, with scale to zero on: True at zero; False and Waking from the moment
    the scale leaves zero until a pod is Ready (WakeTimedOut past the wake timeout, with the
    reason the pods give), then Awake, with how long the wake took."""
    spec = md.spec.autoscaling
    if spec is None or spec.scale_to_zero is None or not spec.scale_to_zero.enabled:
        return None
    zero = spec.scale_to_zero
    previous = next((c for c in md.status.conditions if c.type == "ScaledToZero"), None)
    if counts.desired == 0:
        how = (
            f"the activator holds the next request and wakes it (wake timeout {zero.wake_timeout})"
            if view is not None and view.configured
            else "no activator is installed (the chart's activator.enabled), so nothing wakes"
            " it: scale it up (kubectl scale)"
        )
        message = f"0 replicas after no requests for {zero.idle_after}: {how}"
        return ("ScaledToZero", "True", "ScaledToZero", message)
    woken = previous is not None and (previous.status == "True" or previous.reason in WAKING)
    if previous is not None and woken and counts.available == 0:
        # The transition to False is the wake: its time stays while the reason changes.
        started = previous.last_transition_time if previous.status == "False" else now
        if (seconds_between(started, now) or 0.0) > parse_duration(zero.wake_timeout):
            why = problems[0].message if problems else "no pod is Ready yet"
            message = (
                f"woken from zero {zero.wake_timeout} ago and no pod is Ready ({why}):"
                " held requests got 503 with Retry-After"
            )
            return ("ScaledToZero", "False", "WakeTimedOut", message)
        message = (
            f"woken from zero to {counts.desired}: the activator holds requests until a pod"
            " is Ready"
        )
        return ("ScaledToZero", "False", "Waking", message)
    if previous is not None and previous.reason in WAKING and counts.available > 0:
        took = seconds_between(previous.last_transition_time, now)
        message = "a pod was Ready" + (
            f" {took:.1f}s after the scale-up from zero" if took is not None else ""
        )
    elif previous is not None and previous.reason == "Awake":
        message = previous.message
    else:
        message = f"{counts.desired} replicas asked for"
    return ("ScaledToZero", "False", "Awake", message)


def capacity_condition(message: str | None) -> tuple[str, ConditionStatus, str, str]:
    """AtGPUCapacity: True while the autoscaler wants more replicas than the GPUs hold."""
    if message is not None:
        return ("AtGPUCapacity", "True", "GPUCapacityReached", message)
    return ("AtGPUCapacity", "False", "WithinCapacity", "the reachable GPUs hold what is wanted")


def canary_condition(
    canary: TrackStatus | None, analysis: Sequence[AnalysisResult], analysed: bool
) -> tuple[str, ConditionStatus, str, str] | None:
    """CanaryHealthy, while a canary runs (absent otherwise): Unknown until its pods are
    Ready and, with an analysis, until one has a verdict; then True or False by the last
    analysis (True on Ready pods alone without one)."""
    if canary is None:
        return None
    name = "CanaryHealthy"
    if canary.ready_since is None:
        return (name, "Unknown", "CanaryNotReady", "the canary's pods are not all Ready yet")
    if not analysed:
        return (name, "True", "CanaryReady", "the canary's pods are Ready; no analysis judges it")
    return (name, *analysis_verdict(analysis))


def analysis_verdict(analysis: Sequence[AnalysisResult]) -> tuple[ConditionStatus, str, str]:
    """The last analysis, as CanaryHealthy's (status, reason, message)."""
    if not analysis:
        return ("Unknown", "AwaitingAnalysis", "no analysis of the canary yet")
    failed = [a.name for a in analysis if a.result == "Failed"]
    if failed:
        return ("False", "AnalysisFailed", f"the last analysis failed: {', '.join(failed)}")
    unknown = [a.name for a in analysis if a.result == "Inconclusive"]
    if unknown:
        return ("Unknown", "AnalysisInconclusive", f"no data for {', '.join(unknown)}")
    return ("True", "AnalysisPassed", "the last analysis passed")


def merge_conditions(
    previous: Sequence[Condition],
    decided: Sequence[tuple[str, ConditionStatus, str, str]],
    generation: int,
    now: str,
) -> list[Condition]:
    """Keep lastTransitionTime unless the condition's status changed."""
    before = {c.type: c for c in previous}
    merged = []
    for type_, status, reason, message in decided:
        old = before.get(type_)
        changed = old is None or old.status != status
        merged.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                observed_generation=generation,
                last_transition_time=now if changed or old is None else old.last_transition_time,
            )
        )
    return merged


def compute_status(
    md: ModelDeployment,
    observed: Observed,
    revision: str,
    now: str,
) -> ModelDeploymentStatus:
    """The status to write, given the previous one (``md.status``) and what was observed."""
    counts = count(md, observed)
    problems = find_problems(md, observed)
    rollout = observed.rollout
    canary = rollout.canary if rollout is not None else None
    phase = decide_phase(counts, problems, observed.deployment is not None, canary is not None)
    decided = decide_conditions(
        counts,
        problems,
        phase,
        rollout.message if rollout else "",
        rollout.reason if rollout else "Canary",
    )
    if md.spec.autoscaling is not None:
        decided.append(capacity_condition(observed.at_gpu_capacity))
        decided.append(scaling_condition(observed.autoscaling))
        zero = zero_condition(md, counts, problems, observed.activation, now)
        if zero is not None:
            decided.append(zero)
    analysed = md.spec.rollout is not None and md.spec.rollout.analysis is not None
    healthy = canary_condition(canary, rollout.analysis if rollout else (), analysed)
    if healthy is not None:
        decided.append(healthy)
    conditions = merge_conditions(md.status.conditions, decided, md.metadata.generation, now)
    if rollout is None:
        rollout = RolloutView(stable=TrackStatus(version=md.spec.model.version, revision=revision))
    gpu = md.spec.resources.gpu
    return md.status.model_copy(
        update={
            "observed_generation": md.metadata.generation,
            "phase": phase,
            "replicas": counts.replicas,
            "ready_replicas": counts.ready,
            "updated_replicas": counts.updated,
            "available_replicas": counts.available,
            # Only models that come as archives go through the node cache.
            "warm_replicas": counts.warm
            if md.spec.model.storage_uri.startswith("oci://")
            else None,
            "ready": f"{counts.ready}/{counts.desired}",
            "gpus": counts.desired * gpu.count if gpu else 0,
            "selector": selector_string(md),
            "stable": rollout.stable,
            "canary": rollout.canary,
            "rollback": rollout.rollback,
            "history": list(rollout.history) or md.status.history,
            "analysis": list(rollout.analysis),
            "autoscaling": observed.autoscaling,
            "activation": observed.activation.status if observed.activation else None,
            "conditions": conditions,
        }
    )


def recreated_events(
    md: ModelDeployment,
    seen: Mapping[str, Mapping[str, Any] | None],
    desired: Sequence[Mapping[str, Any]],
    failing: bool,
) -> list[EventSpec]:
    """A Warning for each child found deleted: one this generation of the spec already had
    (its status says the generation was reconciled, and no apply was failing), that the
    snapshot shows absent (``seen`` holds it as None: the watches vouch for it). The pass
    creates it again; the Event says someone deleted it."""
    if failing or md.status.observed_generation != md.metadata.generation:
        return []
    found = []
    for obj in desired:
        key = f"{obj['kind']}/{obj['metadata']['name']}"
        if key in seen and seen[key] is None:
            kind, name = key.split("/", 1)
            found.append(
                EventSpec("Warning", "Recreated", f"{kind} {name} was deleted; created it again")
            )
    return found


def transition_events(
    previous: ModelDeploymentStatus, current: ModelDeploymentStatus
) -> list[EventSpec]:
    """Events for conditions whose status or reason changed; nothing when nothing did."""
    before = {c.type: c for c in previous.conditions}
    events: list[EventSpec] = []
    for condition in current.conditions:
        old = before.get(condition.type)
        if old is not None and (old.status, old.reason) == (condition.status, condition.reason):
            continue
        if condition.type == "Degraded":
            if condition.status == "True":
                events.append(EventSpec("Warning", condition.reason, condition.message))
            elif old is not None:
                events.append(EventSpec("Normal", "Recovered", "no problems found any more"))
        elif condition.type == "Ready":
            if condition.status == "True":
                events.append(EventSpec("Normal", "Ready", condition.message))
            elif old is not None and old.status == "True" and condition.reason != "ScaledToZero":
                # (Asleep on purpose: the ScaledToZero condition's Event says so.)
                events.append(EventSpec("Warning", "NotReady", condition.message))
        elif condition.type == "Progressing" and condition.status == "False":
            kind: Literal["Normal", "Warning"] = (
                "Normal" if condition.reason == "RolloutComplete" else "Warning"
            )
            events.append(EventSpec(kind, condition.reason, condition.message))
        elif condition.type == "ScalingActive" and condition.status == "False":
            events.append(EventSpec("Warning", condition.reason, condition.message))
        elif condition.type == "AtGPUCapacity" and condition.status == "True":
            events.append(EventSpec("Warning", "AtGPUCapacity", condition.message))
        elif condition.type == "ScaledToZero" and old is not None:
            events += zero_events(old, condition)
    return events


def zero_events(old: Condition, new: Condition) -> list[EventSpec]:
    """ScaledToZero, Waking and Awake (after a wake) as Normal Events, WakeTimedOut a
    Warning."""
    if new.reason == "WakeTimedOut":
        return [EventSpec("Warning", new.reason, new.message)]
    if new.reason != "Awake" or old.reason in WAKING:
        return [EventSpec("Normal", new.reason, new.message)]
    return []


def wake_seconds(
    previous: ModelDeploymentStatus, current: ModelDeploymentStatus, now: str
) -> float | None:
    """How long the wake took, on the pass that saw it end (a Ready pod after Waking)."""
    before = next((c for c in previous.conditions if c.type == "ScaledToZero"), None)
    after = next((c for c in current.conditions if c.type == "ScaledToZero"), None)
    if before is None or after is None or before.reason not in WAKING or after.reason != "Awake":
        return None
    return seconds_between(before.last_transition_time, now)
