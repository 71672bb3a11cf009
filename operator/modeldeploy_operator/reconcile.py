"""The one idempotent, level-based reconcile, and the work queue's workers that run it.

One pass: **observe** (``observe.snapshot``: the Deployments, pods, nodes' GPU products,
missing references and a due canary analysis, read once), **plan** (pure: the rollout's
decision and the children and status that follow from it), **act** (``act``: the status
first, preconditioned on the resourceVersion it was decided from, then the children, then
Events). Every trigger (the ModelDeployment changed, a child or pod changed, the resync timer
fired, the operator started) adds the object's key to one work queue (``workqueue``), and
worker threads run the same code on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from modeldeploy_operator import act, observe
from modeldeploy_operator.api.v1alpha1 import (
    API_VERSION,
    KIND,
    ModelDeployment,
    ModelDeploymentStatus,
    parse_duration,
)
from modeldeploy_operator.autoscaling import plan as scaling
from modeldeploy_operator.autoscaling.activation import (
    SLICE_API,
    ActivationPlan,
    enabled,
    plan_activation,
)
from modeldeploy_operator.autoscaling.decide import desired_replicas
from modeldeploy_operator.builders.budget import build_budget_configmap, exhausted_clients
from modeldeploy_operator.builders.deployment import BuildConfig, build_deployment
from modeldeploy_operator.builders.labels import activator_slice_name, deployment_name, revision_of
from modeldeploy_operator.builders.route import build_route, build_track_service, gateway_routing
from modeldeploy_operator.builders.service import build_service
from modeldeploy_operator.builders.shadow import build_shadow_configmap
from modeldeploy_operator.cache import version_of
from modeldeploy_operator.context import OperatorContext
from modeldeploy_operator.k8s.client import ApiError
from modeldeploy_operator.nodecache import labels_to_add
from modeldeploy_operator.observe import (
    BUDGET_SECONDS,
    REFERENCE_RECHECK_SECONDS,
    Snapshot,
    modeldeployment,
    snapshot,
)
from modeldeploy_operator.rollout.decide import Decision
from modeldeploy_operator.rollout.plan import RolloutPlan, plan_rollout
from modeldeploy_operator.status import (
    ActivationView,
    EventSpec,
    Observed,
    compute_status,
    recreated_events,
    seconds_between,
    transition_events,
    wake_seconds,
)
from modeldeploy_operator.workqueue import Clock, RealClock, Workers, WorkQueue


@dataclass(frozen=True)
class Outcome:
    phase: str | None
    applied: tuple[str, ...] = ()
    status_written: bool = False
    events: tuple[str, ...] = ()
    requeue_after: float | None = None  # seconds until the next analysis or pause end


def children(
    md: ModelDeployment,
    revision: str,
    plan: RolloutPlan,
    build: BuildConfig,
    budget_usage: Mapping[str, float] | None = None,
) -> act.Children:
    """The children a plan asks for (pure): the Service, the track Deployments, with Gateway
    API routing the per-track Services and the HTTPRoute at the canary's weight, with a
    query budget the list of keys over it (when their calls could be summed), and with shadow
    steps ``<name>-shadow`` (what stable's sidecars copy where; empty outside the steps)."""
    targets = plan.targets
    desired: list[dict[str, Any]] = []
    scale: list[act.Scale] = []
    delete: list[tuple[str, str, str]] = []
    if targets.stable == "apply":
        desired.append(build_deployment(md, "stable", revision, build, targets.stable_replicas))
    elif targets.stable == "scale":
        scale.append(act.Scale(deployment_name(md, "stable"), targets.stable_replicas))
    if targets.canary == "delete":
        delete.append(("apps/v1", "Deployment", deployment_name(md, "canary")))
    elif targets.canary == "scale":
        scale.append(act.Scale(deployment_name(md, "canary"), targets.canary_replicas))
    else:
        desired.append(build_deployment(md, "canary", revision, build, targets.canary_replicas))
    desired.append(build_service(md))
    if budget_usage is not None:
        desired.append(build_budget_configmap(md, exhausted_clients(md, budget_usage)))
    if md.spec.shadow_steps():
        shadow = plan.shadow
        desired.append(
            build_shadow_configmap(
                md, shadow.revision, shadow.version, shadow.percent, shadow.targets
            )
            if shadow is not None
            else build_shadow_configmap(md, "", "", 0, ())
        )
    routing = gateway_routing(md)
    if routing is not None:
        canary = plan.view.canary
        weight = (canary.weight or 0) if canary else 0
        desired += [
            build_track_service(md, "stable"),
            build_track_service(md, "canary"),
            build_route(md, routing, weight),
        ]
    return act.Children(tuple(desired), tuple(scale), tuple(delete))


def parse(body: Mapping[str, Any], key: str, ctx: OperatorContext) -> ModelDeployment | None:
    try:
        return ModelDeployment.model_validate(body)
    except ValidationError as invalid:
        # The API server validates against the same models, so this means a stale CRD.
        message = f"spec does not match the operator's API: {invalid.errors()[0]['msg']}"
        ctx.logger.error(message, extra={"modeldeployment": key})
        return None


def autoscale(
    md: ModelDeployment, ctx: OperatorContext, revision: str, now: float
) -> scaling.ScalingPlan:
    """One autoscaling round: observe (Prometheus; the GPUs only for a scale-up), decide
    (pure, ``autoscaling``); nothing is written here."""
    spec = md.spec.autoscaling
    key = (md.metadata.namespace, md.metadata.name)
    remove = scaling.retired_engines(md)
    if spec is None:
        ctx.scaling.forget(key)
        return scaling.ScalingPlan(None, remove=remove)
    url = spec.prometheus.url if spec.prometheus else ctx.prometheus_url
    if spec.engine != "builtin":
        return replace(scaling.external(md, spec, url), remove=remove)
    state = ctx.scaling.state(key, now)
    current = md.spec.desired_replicas()
    state.saw(current, now)
    if not scaling.due(spec, state, now):
        return replace(scaling.waiting(md, spec, state, now), remove=remove)
    idle_for = scaling.idle_window(spec, state, current, now)
    inputs = scaling.inputs(
        md,
        state,
        observe.scaling_readings(md, spec, ctx, url),
        idle_for is not None and observe.idle(md, idle_for, ctx, url),
        now,
    )
    policy = scaling.policy_of(spec)
    decision = desired_replicas(inputs, policy)
    capacity = md.status.autoscaling.capacity_replicas if md.status.autoscaling else None
    if scaling.wants_capacity(md, decision):
        capacity = observe.gpu_capacity(md, ctx, revision)
        if capacity is not None:
            decision = desired_replicas(replace(inputs, capacity=capacity), policy)
    plan = scaling.builtin(md, spec, decision, capacity, url, now, ctx.clock())
    return replace(plan, remove=remove)


def scaled(md: ModelDeployment, replicas: int | None) -> ModelDeployment:
    """The ModelDeployment as it is once the autoscaler's count is written."""
    if replicas is None:
        return md
    return md.model_copy(update={"spec": md.spec.model_copy(update={"replicas": replicas})})


def carry_out(
    md: ModelDeployment,
    wanted: act.Children,
    objects: tuple[dict[str, Any], ...],
    seen: Mapping[str, dict[str, Any] | None],
    ctx: OperatorContext,
    now: float,
) -> tuple[list[str], str | None, float | None]:
    """Apply, scale and delete (``act``): what was changed, the last refusal, and when to
    try again after one. A refusal that stays (403 for a quota, 422 from an admission policy,
    404) is not sent again for the same generation of the spec until its backoff is due (10 s,
    doubling, at most every 5 minutes, as controller-runtime retries): it then costs the API
    server a write every five minutes, not one every pass. A new generation tries at once;
    a transient refusal (429, 409, 5xx, no answer) goes again on the next pass."""
    key = (md.metadata.namespace, md.metadata.name)
    held = ctx.apply_holds.get(key)
    if held is not None and held[0] == md.metadata.generation and now < held[1]:
        return [], ctx.apply_errors.get(key), held[1] - now
    applied, error = act.carry_out(md, wanted, ctx, seen)
    engine_applied, engine_error = act.apply_objects(md, objects, ctx, seen)
    applied += engine_applied
    error = error or engine_error
    if error is None or (isinstance(error, act.Refusal) and error.transient):
        ctx.apply_backoff.forget(key)  # a transient one goes again on the next pass, as before
        ctx.apply_holds.pop(key, None)
        return applied, error, None
    if held is not None and held[0] != md.metadata.generation:
        ctx.apply_backoff.forget(key)  # a new spec: its refusals count from the start
    delay = ctx.apply_backoff.when(key)
    ctx.apply_holds[key] = (md.metadata.generation, now + delay)
    return applied, error, delay


def count_wake(ctx: OperatorContext, seconds: float | None) -> None:
    if seconds is not None:
        ctx.telemetry.wake_seconds.observe(seconds)


def activation_of(
    md: ModelDeployment, seen: Snapshot, ctx: OperatorContext, now: float
) -> ActivationPlan:
    """Scale from zero's plan; the activator's endpoints are read only for models that
    scale to zero."""
    replicas = ((seen.stable or {}).get("spec") or {}).get("replicas")
    activator = observe.activator(ctx) if enabled(md) else None
    return plan_activation(md, seen.children, seen.pods, activator, replicas, now)


def routed(wanted: act.Children, activation: ActivationPlan, md: ModelDeployment) -> act.Children:
    """The children with the activator's slice applied or deleted, as the plan says."""
    if activation.apply is not None:
        return replace(wanted, apply=(*wanted.apply, activation.apply))
    if activation.delete:
        return replace(wanted, delete=(*wanted.delete, (*SLICE_API, activator_slice_name(md))))
    return wanted


def waking(md: ModelDeployment, status: ModelDeploymentStatus, now: str) -> float | None:
    """While a wake runs: seconds until its timeout, when the status must say it ran out."""
    zero = md.spec.autoscaling.scale_to_zero if md.spec.autoscaling else None
    condition = next((c for c in status.conditions if c.type == "ScaledToZero"), None)
    if zero is None or condition is None or condition.reason != "Waking":
        return None
    waited = seconds_between(condition.last_transition_time, now) or 0.0
    return max(parse_duration(zero.wake_timeout) - waited, 0.0) + 1.0


def decision_events(decision: Decision | None) -> list[EventSpec]:
    """The rollout's decision, when it did something: a Warning for a rollback or abort."""
    if decision is None or decision.action == "Wait":
        return []
    failed = decision.action in ("Rollback", "Abort")
    return [EventSpec("Warning" if failed else "Normal", decision.reason, decision.message)]


def reconcile(body: Mapping[str, Any], ctx: OperatorContext) -> Outcome:
    """Bring one ModelDeployment's children and status in line with its spec."""
    meta = body["metadata"]
    key = f"{meta['namespace']}/{meta['name']}"
    if meta.get("deletionTimestamp"):
        return Outcome(phase=None)  # going away; garbage collection takes the children
    md = parse(body, key, ctx)
    if md is None:
        return Outcome(phase=None)
    revision = revision_of(md, ctx.build.runtime_image)
    # Observe, and plan the autoscaler's round; the pass goes on at the count it decided.
    now = ctx.epoch()
    autoscaling = autoscale(md, ctx, revision, now)
    md = scaled(md, autoscaling.replicas)
    seen = snapshot(md, meta.get("annotations"), revision, ctx, now)
    # Plan. At zero, callers go to the activator before the last pod goes.
    activation = activation_of(md, seen, ctx, now)
    rolled = scaled(md, activation.hold_replicas)
    plan = plan_rollout(rolled, revision, seen.world, now)
    wanted = routed(children(rolled, revision, plan, ctx.build, seen.budget_usage), activation, md)
    retired = tuple((v, k, md.metadata.name) for v, k in autoscaling.remove)
    wanted = replace(wanted, delete=wanted.delete + retired)
    remembered = ctx.apply_errors.get((md.metadata.namespace, md.metadata.name))
    observed = Observed(
        deployment=seen.stable,
        canary_deployment=seen.canary,
        rollout=plan.view,
        pods=seen.pods,
        gpu_products=seen.gpu_products,
        missing=seen.missing,
        apply_error=remembered or autoscaling.error,
        autoscaling=autoscaling.view,
        at_gpu_capacity=autoscaling.at_capacity,
        activation=ActivationView(activation.status, activation.configured)
        if enabled(md)
        else None,
    )
    stamp = ctx.clock()
    status = compute_status(md, observed, revision, stamp)
    count_wake(ctx, wake_seconds(md.status, status, stamp))
    events = transition_events(md.status, status) if status != md.status else []
    events += recreated_events(  # the activator's slice comes and goes by design
        md,
        seen.children,
        [o for o in (*wanted.apply, *autoscaling.objects) if o is not activation.apply],
        remembered is not None,
    )
    if autoscaling.event is not None:
        events.append(autoscaling.event)
    events += decision_events(plan.decision)
    # Act: the decision persisted first, then carried out.
    wrote = act.write_status(md, meta, status, ctx)
    if autoscaling.replicas is not None:
        act.scale_modeldeployment(md, autoscaling.replicas, wrote.version, ctx)
    applied, error, retry_in = carry_out(md, wanted, autoscaling.objects, seen.children, ctx, now)
    act.open_gates(md, plan.admit, ctx)
    if ctx.build.model_cache_dir is not None:
        act.label_nodes(ctx, labels_to_add(seen.pods, frozenset(ctx.node_labels)))
    if autoscaling.evaluation is not None:  # carried out: the round counts
        ctx.scaling.state((md.metadata.namespace, md.metadata.name), now).record(
            autoscaling.evaluation
        )
    requeue = [
        plan.requeue_after,
        autoscaling.requeue_after,
        retry_in,
        activation.requeue_after,  # a held scale-down to zero
        waking(md, status, stamp),
    ]
    if seen.missing:  # look for them again soon: nothing else would trigger a pass
        requeue.append(REFERENCE_RECHECK_SECONDS)
    if md.spec.monitoring.auth and md.spec.monitoring.auth.query_budget:
        requeue.append(BUDGET_SECONDS)
    if error != remembered:  # reported by the next pass, at once
        if error is None:
            ctx.apply_errors.pop((md.metadata.namespace, md.metadata.name), None)
        else:
            ctx.apply_errors[(md.metadata.namespace, md.metadata.name)] = error
        requeue.append(0.0)
    involved = {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta}
    act.emit_events(ctx, involved, key, events)
    ctx.telemetry.phases.set((md.metadata.namespace, md.metadata.name), status.phase or "Pending")
    return Outcome(
        phase=status.phase,
        applied=tuple(applied),
        status_written=wrote.written,
        events=tuple(e.reason for e in events),
        requeue_after=min((t for t in requeue if t is not None), default=None),
    )


Key = tuple[str, str]  # (namespace, name)


class Reconciler:
    """Runs reconcile off a rate-limited work queue (``workqueue``) in ``workers`` threads:
    never one object twice at once, triggers that arrive during a pass coalesced into one
    more, failures retried with per-object backoff, ``requeue_after`` honoured by the queue.

    Triggers only ``add`` keys (kopf's handlers, the resync); ``start`` runs the workers once
    this process leads, ``stop`` lets each finish its object.
    """

    def __init__(
        self,
        ctx: OperatorContext,
        *,
        workers: int = 4,
        budget_seconds: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        self.ctx = ctx
        self.budget_seconds = budget_seconds
        self.clock: Clock = clock or RealClock()
        telemetry = ctx.telemetry
        self.queue: WorkQueue[Key] = WorkQueue(
            self.clock,
            on_wait=telemetry.workqueue_wait.observe,
            on_retry=telemetry.workqueue_retries.inc,
        )
        telemetry.workqueue_depth.set_function(self.queue.depth)
        telemetry.workqueue_delayed.set_function(self.queue.delayed)
        telemetry.cache_objects.source = ctx.cache.sizes
        self.workers = Workers(
            self.queue, self.handle, workers, ctx.logger, self.clock, name="reconcile"
        )

    # -- what triggers call --------------------------------------------------------------------

    def add(self, namespace: str, name: str, *, urgent: bool = False) -> None:
        """Ask for a pass over this object (non-blocking); ``urgent`` ahead of the others."""
        self.queue.add((namespace, name), urgent=urgent)

    def forget(self, namespace: str, name: str) -> None:
        """The object was deleted: drop its backoff, its scheduled passes and what the
        operator remembers of it."""
        self.queue.discard((namespace, name))
        self._drop((namespace, name))

    # -- the workers ---------------------------------------------------------------------------

    def start(self) -> None:
        self.workers.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Hand out no more keys and wait up to ``timeout`` s for the passes that run."""
        return self.workers.stop(timeout)

    def dead_workers(self) -> list[str]:
        return self.workers.dead()

    def longest_running(self, now: float) -> tuple[Key, float] | None:
        """The reconcile running longest and for how many seconds (monotonic ``now``); None
        when none runs. Health fails when this exceeds its budget: a stuck worker."""
        return self.workers.longest_running(now)

    def handle(self, key: Key) -> Outcome | None:
        """One pass over ``key`` and what the queue does next (controller-runtime's rules):
        success forgets the backoff and honours ``requeue_after``; a conflict (409) goes
        again at once, without backoff; a deleted object is forgotten; any other failure is
        retried after the object's backoff."""
        namespace, name = key
        result, outcome, error = self._once(namespace, name)
        if result == "success":
            self.queue.forget(key)
            if outcome is not None and outcome.requeue_after is not None:
                self.queue.add_after(key, outcome.requeue_after)
        elif result == "gone":
            self.queue.discard(key)
        elif result == "conflict":
            self.queue.add(key)  # written meanwhile: decide again from what is there now
        else:
            delay = self.queue.add_rate_limited(key)
            self.ctx.logger.error(
                f"Reconcile failed; retrying in {delay:g} s",
                exc_info=error,
                extra={"modeldeployment": f"{namespace}/{name}"},
            )
        return outcome

    def _once(self, namespace: str, name: str) -> tuple[str, Outcome | None, Exception | None]:
        started = self.clock.monotonic()
        result = "error"
        body: dict[str, Any] | None = None
        try:
            body = modeldeployment(self.ctx, namespace, name)
            if body is None:  # deleted; also undoes a pass that ran past the DELETED event
                result = "gone"
                self._drop((namespace, name))
                return result, None, None
            outcome = reconcile(body, self.ctx)
            result = "success"
            return result, outcome, None
        except ApiError as error:
            if error.status == 404:  # deleted while we worked: nothing left to do
                result = "gone"
                return result, None, None
            if error.status == 409:
                result = "conflict"
                if body is not None:  # the cache still shows this copy: read it fresh next
                    self.ctx.cache.supersede((namespace, name), f"{KIND}/{name}", version_of(body))
                return result, None, None
            self.ctx.telemetry.reconcile_errors.labels(f"api_{error.status}").inc()
            return result, None, error
        except Exception as error:
            self.ctx.telemetry.reconcile_errors.labels("unexpected").inc()
            return result, None, error
        finally:
            took = self.clock.monotonic() - started
            self.ctx.telemetry.reconcile_duration.labels(result).observe(took)
            if took > self.budget_seconds:
                self.ctx.telemetry.reconcile_over_budget.inc()
                self.ctx.logger.warning(
                    f"Reconcile of ModelDeployment {namespace}/{name} took {took:.1f} s,"
                    f" over its budget of {self.budget_seconds:g} s",
                    extra={"modeldeployment": f"{namespace}/{name}", "result": result},
                )

    def _drop(self, key: Key) -> None:
        self.ctx.events.forget(f"{key[0]}/{key[1]}/")
        self.ctx.telemetry.phases.forget(key)
        self.ctx.scaling.forget(key)
        self.ctx.apply_errors.pop(key, None)
        self.ctx.apply_holds.pop(key, None)
        self.ctx.apply_backoff.forget(key)
        self.ctx.references.pop(key, None)
        self.ctx.cache.forget(key)
