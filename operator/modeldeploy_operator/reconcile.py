"""The one idempotent, level-based reconcile, and the per-object queue that runs it.

``reconcile()`` reads the ModelDeployment fresh, builds the desired children (pure), applies
those that drifted, observes pods and nodes, computes status (pure), writes it only when it
changed, and emits Events only for transitions. Every trigger (the ModelDeployment changed,
a child or pod changed, the resync timer fired, the operator started) runs the same code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from modeldeploy_operator import autoscaler, canary
from modeldeploy_operator.api.v1alpha1 import (
    API_VERSION,
    KIND,
    ModelDeployment,
    ModelDeploymentStatus,
    TrackStatus,
)
from modeldeploy_operator.builders.deployment import build_deployment
from modeldeploy_operator.builders.labels import deployment_name, revision_of, selector_string
from modeldeploy_operator.builders.route import build_route, build_track_service, gateway_routing
from modeldeploy_operator.builders.service import build_service
from modeldeploy_operator.context import OperatorContext
from modeldeploy_operator.drift import needs_apply
from modeldeploy_operator.k8s.client import ApiError
from modeldeploy_operator.status import (
    EventSpec,
    MissingReference,
    Observed,
    RolloutView,
    compute_status,
    transition_events,
)


@dataclass(frozen=True)
class Outcome:
    phase: str | None
    applied: tuple[str, ...] = ()
    status_written: bool = False
    events: tuple[str, ...] = ()
    requeue_after: float | None = None  # seconds until the next analysis or pause end


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning ``old`` into ``new`` (removed keys become null)."""
    patch: dict[str, Any] = dict(new)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def dump(model: BaseModel) -> dict[str, Any]:
    dumped: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    return dumped


def missing_references(md: ModelDeployment, ctx: OperatorContext) -> tuple[MissingReference, ...]:
    """Secrets and ConfigMaps the spec names that do not exist."""
    ns = md.metadata.namespace
    wanted: list[tuple[str, str, str]] = []
    if md.spec.model.credentials_secret:
        wanted.append(("Secret", md.spec.model.credentials_secret, "spec.model.credentialsSecret"))
    monitoring = md.spec.monitoring
    if monitoring.runtime.enabled and monitoring.auth and monitoring.auth.api_key_secret:
        wanted.append(
            ("Secret", monitoring.auth.api_key_secret.name, "spec.monitoring.auth.apiKeySecret")
        )
    if monitoring.runtime.enabled and monitoring.runtime.reference_profile:
        ref = monitoring.runtime.reference_profile.config_map_ref.name
        wanted.append(("ConfigMap", ref, "spec.monitoring.runtime.referenceProfile"))
    return tuple(
        MissingReference(kind, name, path)
        for kind, name, path in wanted
        if ctx.api.get("v1", kind, ns, name) is None
    )


def apply_objects(
    md: ModelDeployment, desired: list[dict[str, Any]], ctx: OperatorContext
) -> tuple[dict[str, dict[str, Any] | None], list[str], str | None]:
    """Apply those of ``desired`` that drifted. Returns each object as it now is (by kind and
    name), what was applied, and the last refusal, which status reports as ApplyFailed."""
    current: dict[str, dict[str, Any] | None] = {}
    applied: list[str] = []
    error: str | None = None
    ns = md.metadata.namespace
    for obj in desired:
        kind, name = obj["kind"], obj["metadata"]["name"]
        observed = ctx.api.get(obj["apiVersion"], kind, ns, name)
        current[f"{kind}/{name}"] = observed
        if not needs_apply(observed, obj):
            continue
        try:
            current[f"{kind}/{name}"] = ctx.api.apply(obj)
        except ApiError as failure:
            # Reported in status (ApplyFailed) and retried on the next trigger or resync.
            error = f"{kind} {ns}/{name} was refused ({failure.status}): {failure.message}"
            ctx.logger.warning(error, extra={"modeldeployment": f"{ns}/{md.metadata.name}"})
            continue
        verb = "Created" if observed is None else "Updated"
        ctx.logger.info(
            f"{verb} {kind} {ns}/{name}", extra={"modeldeployment": f"{ns}/{md.metadata.name}"}
        )
        applied.append(f"{kind}/{name}")
    return current, applied, error


def apply_children(
    md: ModelDeployment, revision: str, ctx: OperatorContext, stable: bool = True
) -> tuple[dict[str, Any] | None, list[str], str | None]:
    """Apply the Service and, when ``stable``, the stable Deployment (a rollout owns it
    otherwise, and it is only read); returns the stable Deployment, what was applied, any error."""
    name = deployment_name(md, "stable")
    desired = [build_service(md)]
    if stable:
        desired.insert(0, build_deployment(md, "stable", revision, ctx.build))
    current, applied, error = apply_objects(md, desired, ctx)
    if stable:
        return current.get(f"Deployment/{name}"), applied, error
    return ctx.api.get("apps/v1", "Deployment", md.metadata.namespace, name), applied, error


def apply_routing(
    md: ModelDeployment, rollout: RolloutView | None, ctx: OperatorContext
) -> tuple[list[str], str | None]:
    """With Gateway API routing: the per-track Services and the HTTPRoute at the canary's
    weight (0 when no canary runs)."""
    routing = gateway_routing(md)
    if routing is None:
        return [], None
    weight = (rollout.canary.weight or 0) if rollout and rollout.canary else 0
    desired = [
        build_track_service(md, "stable"),
        build_track_service(md, "canary"),
        build_route(md, routing, weight),
    ]
    _, applied, error = apply_objects(md, desired, ctx)
    return applied, error


def emit_events(
    ctx: OperatorContext, involved: dict[str, Any], key: str, events: list[EventSpec]
) -> None:
    """Post the Events; best effort, since status already tells the truth."""
    for event in events:
        try:
            ctx.api.emit_event(involved, event.type, event.reason, event.message)
        except ApiError as failure:  # Events are best effort; status already tells the truth
            terminating = "being terminated" in failure.message  # the namespace is going away
            ctx.logger.log(
                logging.DEBUG if terminating else logging.WARNING,
                f"Could not emit Event {event.reason}: {failure}",
                extra={"modeldeployment": key},
            )
            continue
        ctx.telemetry.events.labels(event.type, event.reason).inc()
        ctx.logger.info(
            f"{event.reason}: {event.message}", extra={"modeldeployment": key, "event": event.type}
        )


def write_status(
    md: ModelDeployment,
    meta: Mapping[str, Any],
    status: ModelDeploymentStatus,
    ctx: OperatorContext,
) -> bool:
    """Write the status when it changed, then consume a command; True when written."""
    old, new = dump(md.status), dump(status)
    written = old != new
    if written:
        # A rollout's progress is written only onto the object it was decided from: two
        # writers (say, an old and a new operator) cannot both advance a step.
        precondition = meta.get("resourceVersion") if md.status.canary or status.canary else None
        ctx.api.patch_status(
            md.metadata.namespace, md.metadata.name, status_patch(old, new), precondition
        )
    if canary.COMMAND_ANNOTATION in (meta.get("annotations") or {}):
        # Consumed after the status that records its effect is written (that write is
        # preconditioned on the resourceVersion this removal changes).
        ctx.api.merge_patch(
            API_VERSION,
            KIND,
            md.metadata.namespace,
            md.metadata.name,
            {"metadata": {"annotations": {canary.COMMAND_ANNOTATION: None}}},
        )
    return written


def parse(body: Mapping[str, Any], key: str, ctx: OperatorContext) -> ModelDeployment | None:
    try:
        return ModelDeployment.model_validate(body)
    except ValidationError as invalid:
        # The API server validates against the same models, so this means a stale CRD.
        message = f"spec does not match the operator's API: {invalid.errors()[0]['msg']}"
        ctx.logger.error(message, extra={"modeldeployment": key})
        return None


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
    scaling = autoscaler.run(md, ctx, revision, ctx.epoch())
    if scaling.scaled:  # spec.replicas changed: go on from the object as it is now
        fresh = ctx.api.get(API_VERSION, KIND, md.metadata.namespace, md.metadata.name)
        md = parse(fresh, key, ctx) if fresh is not None else None
        if fresh is None or md is None:
            return Outcome(phase=None)
        body, meta = fresh, fresh["metadata"]
    how = canary.mode(md, revision)
    if how == "held" and canary.requested(dict(body)) == "retry":
        how = "canary"  # a fresh rollout of the held revision; status.rollback is cleared
    deployment, applied, apply_error = apply_children(md, revision, ctx, stable=how == "rolling")
    pods = ctx.api.list("v1", "Pod", md.metadata.namespace, selector_string(md))
    rollout, canary_deployment, decision, requeue_after = None, None, None, None
    if how == "canary" and deployment is not None:
        result = canary.run(md, dict(body), revision, deployment, pods, ctx, ctx.epoch())
        rollout, canary_deployment = result.view, result.canary_deployment
        decision, requeue_after = result.decision, result.requeue_after
        if result.promote:
            deployment, promoted, apply_error = apply_children(md, revision, ctx)
            applied += promoted
            ctx.api.delete(
                "apps/v1", "Deployment", md.metadata.namespace, deployment_name(md, "canary")
            )
            canary_deployment = None
    elif how == "held":
        rollout = RolloutView(
            stable=md.status.stable or TrackStatus(),
            rollback=md.status.rollback,
            history=tuple(md.status.history),
        )
    elif md.status.canary is not None:  # the rollout was switched off mid-way
        ctx.api.delete(
            "apps/v1", "Deployment", md.metadata.namespace, deployment_name(md, "canary")
        )
    routed, routing_error = apply_routing(md, rollout, ctx)
    applied += routed
    _, engine_applied, engine_error = apply_objects(md, list(scaling.objects), ctx)
    applied += engine_applied
    apply_error = apply_error or routing_error or engine_error or scaling.error
    observed = Observed(
        deployment=deployment,
        canary_deployment=canary_deployment,
        rollout=rollout,
        pods=pods,
        gpu_products=ctx.gpus.products() if md.spec.resources.gpu else None,
        missing=missing_references(md, ctx),
        apply_error=apply_error,
        autoscaling=scaling.view,
        at_gpu_capacity=scaling.at_capacity,
    )
    status = compute_status(md, observed, revision, ctx.clock())
    written = write_status(md, meta, status, ctx)
    events = transition_events(md.status, status) if written else []
    if scaling.event is not None:
        events.append(scaling.event)
    if decision is not None and decision.action != "Wait":
        failed = decision.action in ("Rollback", "Abort")
        events.append(
            EventSpec("Warning" if failed else "Normal", decision.reason, decision.message)
        )
    emit_events(ctx, {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta}, key, events)
    ctx.telemetry.phases.set((md.metadata.namespace, md.metadata.name), status.phase or "Pending")
    return Outcome(
        phase=status.phase,
        applied=tuple(applied),
        status_written=written,
        events=tuple(e.reason for e in events),
        requeue_after=min(
            (t for t in (requeue_after, scaling.requeue_after) if t is not None), default=None
        ),
    )


@dataclass
class _KeyState:
    running: bool = False
    dirty: bool = False


@dataclass
class Reconciler:
    """Runs reconcile at most once at a time per object, coalescing triggers that arrive
    meanwhile into one more run."""

    ctx: OperatorContext
    _states: dict[tuple[str, str], _KeyState] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _due: dict[tuple[str, str], float] = field(default_factory=dict)  # monotonic wake-ups

    def due(self, now: float) -> list[tuple[str, str]]:
        """Objects whose requested re-reconcile time has come; they are handed out once."""
        with self._guard:
            ready = [key for key, at in self._due.items() if at <= now]
            for key in ready:
                del self._due[key]
        return ready

    def trigger(self, namespace: str, name: str) -> Outcome | None:
        key = (namespace, name)
        with self._guard:
            state = self._states.setdefault(key, _KeyState())
            if state.running:
                state.dirty = True
                return None
            state.running = True
        outcome: Outcome | None = None
        try:
            while True:
                outcome = self._once(namespace, name)
                with self._guard:
                    if outcome is not None and outcome.requeue_after is not None:
                        self._due[key] = time.monotonic() + outcome.requeue_after
                    if not state.dirty:
                        break
                    state.dirty = False
        finally:
            with self._guard:
                state.running = False
                state.dirty = False
        return outcome

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            state = self._states.get((namespace, name))
            if state is not None and not state.running:
                del self._states[(namespace, name)]
        self.ctx.telemetry.phases.forget((namespace, name))
        self.ctx.scaling.forget((namespace, name))

    def _once(self, namespace: str, name: str) -> Outcome | None:
        started = time.monotonic()
        result = "error"
        try:
            body = self.ctx.api.get(API_VERSION, KIND, namespace, name)
            if body is None:
                result = "gone"
                return None
            outcome = reconcile(body, self.ctx)
            result = "success"
            return outcome
        except ApiError as error:
            if error.status == 404:  # deleted while we worked: nothing left to do
                result = "gone"
                return None
            if error.status == 409:  # written meanwhile: decide again from what is there now
                result = "conflict"
                with self._guard:
                    self._states.setdefault((namespace, name), _KeyState()).dirty = True
                return None
            self.ctx.telemetry.reconcile_errors.labels(f"api_{error.status}").inc()
            raise
        except Exception:
            self.ctx.telemetry.reconcile_errors.labels("unexpected").inc()
            raise
        finally:
            self.ctx.telemetry.reconcile_duration.labels(result).observe(time.monotonic() - started)
