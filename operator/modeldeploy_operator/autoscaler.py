"""Autoscaling: observe (Prometheus, nodes, pods), decide (pure, in ``autoscaling/``), act.

All engines act on the ModelDeployment's scale subresource (``spec.replicas``): the builtin
engine writes it every ``spec.autoscaling.interval`` from the HPA algorithm, an HPA or a KEDA
ScaledObject (engines ``hpa`` and ``keda``, generated here) write it themselves. Reconcile
then keeps the count within bounds and splits it between stable and canary by the canary's
weight, so an autoscaler never fights a rollout (argo-rollouts#3849).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from modeldeploy_operator.api.v1alpha1 import (
    API_VERSION,
    KIND,
    AutoscalingSpec,
    AutoscalingStatus,
    ModelDeployment,
    ScalingDecision,
    ScalingMetricStatus,
    parse_duration,
)
from modeldeploy_operator.autoscaling import AUTOSCALER_MANAGER
from modeldeploy_operator.autoscaling.capacity import replicas_that_fit
from modeldeploy_operator.autoscaling.decide import (
    Decision,
    Inputs,
    Policy,
    Reading,
    Recommendation,
    desired_replicas,
)
from modeldeploy_operator.builders.autoscaler import (
    HPA_API_VERSION,
    KEDA_API_VERSION,
    build_hpa,
    build_scaled_object,
    cpu_cores,
    target_value,
)
from modeldeploy_operator.builders.deployment import build_deployment
from modeldeploy_operator.builders.labels import MD_LABEL
from modeldeploy_operator.context import OperatorContext, ScalingState
from modeldeploy_operator.k8s.client import ApiError
from modeldeploy_operator.metrics.prometheus import ProviderError
from modeldeploy_operator.promql import (
    IDLE_QUERY,
    PER_REPLICA,
    TemplateError,
    metric_name,
    query_of,
    render_query,
    variables,
)
from modeldeploy_operator.status import EventSpec

NO_METRICS_SOURCE = (
    "no Prometheus to read metrics from: set spec.autoscaling.prometheus.url or the operator's"
    " --prometheus-url; the replica count stays as it is"
)

ENGINE_OBJECTS = {
    "hpa": (HPA_API_VERSION, "HorizontalPodAutoscaler"),
    "keda": (KEDA_API_VERSION, "ScaledObject"),
}


@dataclass(frozen=True)
class ScalingResult:
    view: AutoscalingStatus | None  # status.autoscaling
    at_capacity: str | None = None  # the AtGPUCapacity message, when capped
    scaled: bool = False  # spec.replicas was written: reconcile reads the object again
    event: EventSpec | None = None
    objects: tuple[dict[str, Any], ...] = ()  # the hpa or keda engine's object to apply
    error: str | None = None  # reported as ApplyFailed
    requeue_after: float | None = None


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


def read_metrics(
    md: ModelDeployment, spec: AutoscalingSpec, ctx: OperatorContext, url: str | None
) -> list[Reading]:
    cpu = md.spec.resources.cpu
    values = variables(md, None if cpu is None else cpu_cores(cpu))
    readings = []
    for metric in spec.metrics:
        value: float | None
        try:
            if not url:
                raise ProviderError("no Prometheus URL (spec.autoscaling.prometheus.url)")
            value = ctx.metrics_provider(url).query(query_of(metric, values))
        except (ProviderError, TemplateError) as error:
            ctx.logger.debug(
                f"Autoscaling metric {metric_name(metric)}: {error}",
                extra={"modeldeployment": f"{md.metadata.namespace}/{md.metadata.name}"},
            )
            value = None
        readings.append(
            Reading(metric_name(metric), value, target_value(metric), metric.type in PER_REPLICA)
        )
    return readings


def is_idle(md: ModelDeployment, idle_after: float, ctx: OperatorContext, url: str | None) -> bool:
    """No requests reached any sidecar for scaleToZero.idleAfter (no data is not idle)."""
    if not url:
        return False
    query = render_query(IDLE_QUERY, {**variables(md), "idle": f"{int(idle_after)}s"})
    try:
        value = ctx.metrics_provider(url).query(query)
    except ProviderError:
        return False
    return value is not None and value == 0


def gpu_capacity(md: ModelDeployment, ctx: OperatorContext, revision: str) -> int | None:
    """Replicas the reachable GPUs hold; None without GPUs or without the right to list."""
    if md.spec.resources.gpu is None:
        return None
    try:
        nodes = ctx.api.list("v1", "Node", None)
        pods = ctx.api.list("v1", "Pod", None)
    except ApiError as error:
        if error.status in (401, 403):
            return None
        raise
    pod_spec = build_deployment(md, "stable", revision, ctx.build)["spec"]["template"]["spec"]

    def ours(pod: Mapping[str, Any]) -> bool:
        meta = pod.get("metadata") or {}
        return bool(
            meta.get("namespace") == md.metadata.namespace
            and (meta.get("labels") or {}).get(MD_LABEL) == md.metadata.name
        )

    return replicas_that_fit(nodes, pods, pod_spec, ours)


def decision_status(decision: Decision, current: int, now: str) -> ScalingDecision:
    return ScalingDecision.model_validate(
        {
            "time": now,
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


def external_engine(
    md: ModelDeployment, spec: AutoscalingSpec, ctx: OperatorContext
) -> ScalingResult:
    """Engines hpa and keda: generate their object; they write spec.replicas themselves."""
    view = AutoscalingStatus(engine=spec.engine, desired_replicas=md.spec.desired_replicas())
    if spec.engine == "hpa":
        return ScalingResult(view, objects=(build_hpa(md),))
    url = spec.prometheus.url if spec.prometheus else ctx.prometheus_url
    if not url:
        return ScalingResult(
            view,
            error="engine keda needs a Prometheus URL: set spec.autoscaling.prometheus.url"
            " or the operator's --prometheus-url",
        )
    return ScalingResult(view, objects=(build_scaled_object(md, url),))


def builtin_engine(
    md: ModelDeployment, spec: AutoscalingSpec, ctx: OperatorContext, revision: str, now: float
) -> ScalingResult:
    key = (md.metadata.namespace, md.metadata.name)
    state = ctx.scaling.state(key, now)
    previous = md.status.autoscaling
    current = md.spec.desired_replicas()
    interval = spec.interval_seconds()
    if state.last_replicas == 0 and current > 0:
        state.awake_since = now  # woken (kubectl scale): give it idleAfter before sleeping
    state.last_replicas = current
    capped = next(
        (
            c.message
            for c in md.status.conditions
            if c.type == "AtGPUCapacity" and c.status == "True"
        ),
        None,
    )
    capped_before = capped is not None
    if state.last_evaluation is not None and now - state.last_evaluation < interval:
        return ScalingResult(
            previous,
            at_capacity=capped,
            requeue_after=interval - (now - state.last_evaluation),
        )
    state.last_evaluation = now
    url = spec.prometheus.url if spec.prometheus else ctx.prometheus_url
    policy = policy_of(spec)
    idle_for = (
        parse_duration(spec.scale_to_zero.idle_after)
        if spec.scale_to_zero and spec.scale_to_zero.enabled
        else None
    )
    awake_long_enough = idle_for is not None and now - (state.awake_since or now) >= idle_for
    inputs = Inputs(
        now=now,
        current=current,
        readings=read_metrics(md, spec, ctx, url),
        history=tuple(state.history),
        since=state.since,
        idle=idle_for is not None
        and awake_long_enough
        and current > 0
        and is_idle(md, idle_for, ctx, url),
    )
    decision = desired_replicas(inputs, policy)
    capacity = previous.capacity_replicas if previous else None
    if decision.recommendation is not None and decision.recommendation > current:
        capacity = gpu_capacity(md, ctx, revision)
        if capacity is not None:
            decision = desired_replicas(replace(inputs, capacity=capacity), policy)
    remember(state, now, decision, policy)
    stamp = ctx.clock()
    last = previous.last_decision if previous else None
    scaled = decision.replicas != current
    # spec.replicas also follows when only the bounds moved it (say, minReplicas went up):
    # the scale subresource then tells an observer (or an HPA) the count in force.
    write = decision.replicas != md.spec.replicas
    changed_capacity = decision.at_capacity != capped_before
    view = AutoscalingStatus(
        engine="builtin",
        desired_replicas=decision.replicas,
        capacity_replicas=capacity,
        last_scale_time=stamp if scaled else (previous.last_scale_time if previous else None),
        last_decision=decision_status(decision, current, stamp)
        if scaled or changed_capacity
        else last,
        reason=None if url else "NoMetricsSource",
        message=None if url else NO_METRICS_SOURCE,
    )
    event = None
    if write:
        ctx.api.merge_patch(
            API_VERSION,
            f"{KIND}/scale",
            md.metadata.namespace,
            md.metadata.name,
            {"spec": {"replicas": decision.replicas}},
            field_manager=AUTOSCALER_MANAGER,
        )
    if scaled:
        ctx.logger.info(
            f"{decision.reason} from {current} to {decision.replicas}: {decision.message}",
            extra={"modeldeployment": f"{key[0]}/{key[1]}"},
        )
        event = EventSpec(
            "Normal",
            decision.reason,
            f"from {current} to {decision.replicas} replicas: {decision.message}",
        )
    return ScalingResult(
        view,
        at_capacity=decision.message if decision.at_capacity else None,
        scaled=write,
        event=event,
        requeue_after=interval,
    )


def remember(state: ScalingState, now: float, decision: Decision, policy: Policy) -> None:
    """Keep this evaluation's raw recommendation for the stabilisation windows."""
    if decision.recommendation is not None:
        state.history.append(Recommendation(now, decision.recommendation))
    horizon = now - max(policy.up_window, policy.down_window)
    state.history[:] = [r for r in state.history if r.time > horizon]


def run(md: ModelDeployment, ctx: OperatorContext, revision: str, now: float) -> ScalingResult:
    """One autoscaling round; also removes the objects of an engine no longer in use."""
    spec = md.spec.autoscaling
    used = md.status.autoscaling.engine if md.status.autoscaling else None
    wanted = spec.engine if spec else None
    if used in ENGINE_OBJECTS and used != wanted:
        api_version, kind = ENGINE_OBJECTS[used]
        ctx.api.delete(api_version, kind, md.metadata.namespace, md.metadata.name)
    if spec is None:
        ctx.scaling.forget((md.metadata.namespace, md.metadata.name))
        return ScalingResult(None)
    if spec.engine == "builtin":
        return builtin_engine(md, spec, ctx, revision, now)
    return external_engine(md, spec, ctx)
