"""One autoscaling round as a plan: pure functions from what the round observed to what it
wants written.

A round of the builtin engine is due every ``spec.autoscaling.interval``. Reconcile asks
:func:`due`, reads the metrics (``observe``), decides (``decide.desired_replicas``), reads
the GPU capacity only when the decision wants more replicas (:func:`wants_capacity`), and
turns the decision into a :class:`ScalingPlan`: the ``status.autoscaling`` view, the count
for ``spec.replicas``, the Event. ``act`` writes the count through the scale subresource
after the status, and only then does reconcile remember the round (:meth:`ScalingState.record`):
a round whose write was refused is evaluated again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modeldeploy_operator.api.v1alpha1 import (
    AutoscalingSpec,
    AutoscalingStatus,
    ModelDeployment,
    ScalingDecision,
    ScalingMetricStatus,
    parse_duration,
)
from modeldeploy_operator.autoscaling.decide import (
    Decision,
    Inputs,
    Policy,
    Reading,
    Recommendation,
)
from modeldeploy_operator.builders.autoscaler import (
    HPA_API_VERSION,
    KEDA_API_VERSION,
    build_hpa,
    build_scaled_object,
)
from modeldeploy_operator.status import EventSpec

Json = dict[str, Any]

NO_METRICS_SOURCE = (
    "no Prometheus to read metrics from: set spec.autoscaling.prometheus.url or the operator's"
    " --prometheus-url; the replica count stays as it is"
)

ENGINE_OBJECTS = {
    "hpa": (HPA_API_VERSION, "HorizontalPodAutoscaler"),
    "keda": (KEDA_API_VERSION, "ScaledObject"),
}


@dataclass
class ScalingState:
    """What the builtin autoscaler remembers about one ModelDeployment between rounds (in
    memory, like the HPA's recommendations)."""

    since: float  # when the operator started watching it: the history is complete from here
    last_evaluation: float | None = None
    history: list[Recommendation] = field(default_factory=list)  # raw, oldest first
    awake_since: float | None = None  # when it last came up from zero replicas
    last_replicas: int | None = None

    def saw(self, replicas: int, now: float) -> None:
        """Note the count in force; woken from zero (say, ``kubectl scale``), the model gets
        a whole idle window before it may sleep again."""
        if self.last_replicas == 0 and replicas > 0:
            self.awake_since = now
        self.last_replicas = replicas

    def record(self, evaluation: Evaluation) -> None:
        """Remember a round once its plan was carried out: its time, and its raw
        recommendation for the stabilisation windows."""
        self.last_evaluation = evaluation.time
        if evaluation.recommendation is not None:
            self.history.append(Recommendation(evaluation.time, evaluation.recommendation))
        horizon = evaluation.time - evaluation.horizon
        self.history[:] = [r for r in self.history if r.time > horizon]


@dataclass(frozen=True)
class Evaluation:
    time: float
    recommendation: int | None
    horizon: float  # seconds of history the stabilisation windows look at


@dataclass(frozen=True)
class ScalingPlan:
    view: AutoscalingStatus | None  # status.autoscaling
    at_capacity: str | None = None  # the AtGPUCapacity message, when capped
    replicas: int | None = None  # spec.replicas to write (scale subresource); None: leave it
    event: EventSpec | None = None
    objects: tuple[Json, ...] = ()  # the hpa or keda engine's object to apply
    remove: tuple[tuple[str, str], ...] = ()  # (api version, kind) of engines no longer used
    error: str | None = None  # reported as ApplyFailed
    requeue_after: float | None = None
    evaluation: Evaluation | None = None  # remembered once the plan is carried out


def policy_of(spec: AutoscalingSpec) -> Policy:
    behavior = spec.behavior
    return Policy(
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        scale_to_zero=bool(spec.scale_to_zero and spec.scale_to_zero.enabled),
        tolerance=behavior.tolerance(),
        up_window=parse_duration(behavior.scale_up_stabilization),
        down_window=parse_duration(behavior.scale_down_stabilization),
        max_up_step=behavior.max_scale_up_step,
        max_down_step=behavior.max_scale_down_step,
    )


def retired_engines(md: ModelDeployment) -> tuple[tuple[str, str], ...]:
    """The objects of the engine status says is in use, when the spec moved off it."""
    spec = md.spec.autoscaling
    used = md.status.autoscaling.engine if md.status.autoscaling else None
    wanted = spec.engine if spec else None
    return (ENGINE_OBJECTS[used],) if used in ENGINE_OBJECTS and used != wanted else ()


def capped(md: ModelDeployment) -> str | None:
    """The AtGPUCapacity message the last status carries, when it is True."""
    return next(
        (
            c.message
            for c in md.status.conditions
            if c.type == "AtGPUCapacity" and c.status == "True"
        ),
        None,
    )


def due(spec: AutoscalingSpec, state: ScalingState, now: float) -> bool:
    last = state.last_evaluation
    return last is None or now - last >= spec.interval_seconds()


def waiting(
    md: ModelDeployment, spec: AutoscalingSpec, state: ScalingState, now: float
) -> ScalingPlan:
    """Between rounds: status as it was, and a pass when the next round is due."""
    last = state.last_evaluation if state.last_evaluation is not None else now
    return ScalingPlan(
        md.status.autoscaling,
        at_capacity=capped(md),
        requeue_after=max(spec.interval_seconds() - (now - last), 0.0),
    )


def idle_window(
    spec: AutoscalingSpec, state: ScalingState, current: int, now: float
) -> float | None:
    """The idle period to ask Prometheus about, when scale to zero could act now: enabled,
    replicas up, and awake for at least that long."""
    if not (spec.scale_to_zero and spec.scale_to_zero.enabled) or current <= 0:
        return None
    idle_for = parse_duration(spec.scale_to_zero.idle_after)
    awake = now - (state.awake_since if state.awake_since is not None else now)
    return idle_for if awake >= idle_for else None


def inputs(
    md: ModelDeployment,
    state: ScalingState,
    readings: tuple[Reading, ...],
    idle: bool,
    now: float,
) -> Inputs:
    return Inputs(
        now=now,
        current=md.spec.desired_replicas(),
        readings=readings,
        history=tuple(state.history),
        since=state.since,
        idle=idle,
    )


def wants_capacity(md: ModelDeployment, decision: Decision) -> bool:
    """A scale-up of GPU pods: worth reading what the reachable GPUs hold."""
    return (
        md.spec.resources.gpu is not None
        and decision.recommendation is not None
        and decision.recommendation > md.spec.desired_replicas()
    )


def decision_status(decision: Decision, current: int, stamp: str) -> ScalingDecision:
    return ScalingDecision.model_validate(
        {
            "time": stamp,
            "from": current,
            "to": decision.replicas,
            "reason": decision.reason,
            "message": decision.message,
            "metrics": [
                ScalingMetricStatus(
                    name=m.name, value=m.value, target=m.target, replicas=m.replicas
                )
                for m in decision.metrics
            ],
        }
    )


def builtin(
    md: ModelDeployment,
    spec: AutoscalingSpec,
    decision: Decision,
    capacity: int | None,
    url: str | None,
    now: float,
    stamp: str,
) -> ScalingPlan:
    """The plan of a round of the builtin engine that decided ``decision``."""
    previous = md.status.autoscaling
    current = md.spec.desired_replicas()
    scaled = decision.replicas != current
    changed_capacity = decision.at_capacity != (capped(md) is not None)
    policy = policy_of(spec)
    view = AutoscalingStatus(
        engine="builtin",
        desired_replicas=decision.replicas,
        capacity_replicas=capacity,
        last_scale_time=stamp if scaled else (previous.last_scale_time if previous else None),
        last_decision=decision_status(decision, current, stamp)
        if scaled or changed_capacity
        else (previous.last_decision if previous else None),
        reason=None if url else "NoMetricsSource",
        message=None if url else NO_METRICS_SOURCE,
    )
    event = (
        EventSpec(
            "Normal",
            decision.reason,
            f"from {current} to {decision.replicas} replicas: {decision.message}",
        )
        if scaled
        else None
    )
    return ScalingPlan(
        view,
        at_capacity=decision.message if decision.at_capacity else None,
        # spec.replicas also follows when only the bounds moved it (say, minReplicas went
        # up): the scale subresource then tells an observer (or an HPA) the count in force.
        replicas=decision.replicas if decision.replicas != md.spec.replicas else None,
        event=event,
        requeue_after=spec.interval_seconds(),
        evaluation=Evaluation(
            now, decision.recommendation, max(policy.up_window, policy.down_window)
        ),
    )


def external(md: ModelDeployment, spec: AutoscalingSpec, url: str | None) -> ScalingPlan:
    """Engines hpa and keda: generate their object; they write spec.replicas themselves."""
    view = AutoscalingStatus(engine=spec.engine, desired_replicas=md.spec.desired_replicas())
    if spec.engine == "hpa":
        return ScalingPlan(view, objects=(build_hpa(md),))
    if not url:
        return ScalingPlan(
            view,
            error="engine keda needs a Prometheus URL: set spec.autoscaling.prometheus.url"
            " or the operator's --prometheus-url",
        )
    return ScalingPlan(view, objects=(build_scaled_object(md, url),))
