"""Act: the one module that writes to the cluster.

A pass's plan is carried out in this order: the status that records the decision first,
written only onto the object it was decided from (a resourceVersion precondition), then the
command annotation that the status consumed (same precondition), then the autoscaler's
``spec.replicas`` through the scale subresource (preconditioned on the version those writes
left), then the children, which are derived from that new status, then Events. An operator
stopped or refused (409) at any point redoes the same decision from what it persisted, never
an older one: a rolled-back canary cannot come back, a step cannot advance twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from modeldeploy_operator.api.v1alpha1 import (
    API_VERSION,
    KIND,
    ModelDeployment,
    ModelDeploymentStatus,
)
from modeldeploy_operator.autoscaling import AUTOSCALER_MANAGER
from modeldeploy_operator.builders.deployment import SERVING_GATE
from modeldeploy_operator.cache import version_of
from modeldeploy_operator.context import OperatorContext
from modeldeploy_operator.drift import needs_apply, others_in_template
from modeldeploy_operator.events import EventWrite, Similar
from modeldeploy_operator.k8s.client import FIELD_MANAGER, ApiError
from modeldeploy_operator.rollout.plan import COMMAND_ANNOTATION, iso
from modeldeploy_operator.status import EventSpec

Json = dict[str, Any]


@dataclass(frozen=True)
class Scale:
    """Set a Deployment's replicas through its scale subresource, keeping its template."""

    name: str
    replicas: int


@dataclass(frozen=True)
class Children:
    """What the children should be after this pass."""

    apply: tuple[Json, ...] = ()  # desired objects, applied when they drifted
    scale: tuple[Scale, ...] = ()
    delete: tuple[tuple[str, str, str], ...] = ()  # (api version, kind, name)


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) turning ``old`` into ``new``: changed values, and null
    for every removed key at any depth. (Nested removals used to be left out, so a cleared
    ``canary.readySince`` stayed on the server and every pass wrote the status again: the
    crash-at-every-write test found it.) Lists are replaced whole, as merge patches do."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            if nested := merge_diff(before, value):
                patch[key] = nested
        elif key not in old or before != value:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


class Refusal(str):
    """A refused write's message (what status reports as ApplyFailed), and the API server's
    status code: a 403 or a 422 stays until something changes, a 429 or a 503 passes."""

    status: int

    def __new__(cls, message: str, status: int) -> Refusal:
        made = super().__new__(cls, message)
        made.status = status
        return made

    @property
    def transient(self) -> bool:
        """Throttled (429), a conflict (409), the server's own trouble (5xx) or no answer."""
        return self.status in (0, 409, 429) or self.status >= 500


def dump(model: BaseModel) -> dict[str, Any]:
    dumped: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    return dumped


@dataclass(frozen=True)
class StatusWrite:
    written: bool  # the status changed and was written
    version: str | None  # the object's resourceVersion after this pass's writes to it


def write_status(
    md: ModelDeployment,
    meta: Mapping[str, Any],
    status: ModelDeploymentStatus,
    ctx: OperatorContext,
) -> StatusWrite:
    """Write the status when it changed, onto the object it was decided from, then consume
    the command it acted on. A 409 means: decide again."""
    old, new = dump(md.status), dump(status)
    version = meta.get("resourceVersion")
    written = old != new
    if written:
        response = ctx.api.patch_status(
            md.metadata.namespace, md.metadata.name, merge_diff(old, new), version
        )
        version = (response.get("metadata") or {}).get("resourceVersion", version)
    if COMMAND_ANNOTATION in (meta.get("annotations") or {}):
        # Preconditioned too: a command set meanwhile (say, an abort) is never lost.
        patch: Json = {"metadata": {"annotations": {COMMAND_ANNOTATION: None}}}
        if version:
            patch["metadata"]["resourceVersion"] = version
        response = ctx.api.merge_patch(
            API_VERSION, KIND, md.metadata.namespace, md.metadata.name, patch
        )
        version = (response.get("metadata") or {}).get("resourceVersion", version)
    if version != meta.get("resourceVersion"):
        # The cache shows the copy this pass decided from until the watch brings the new
        # one: until then, passes read the object from the API server.
        key = (md.metadata.namespace, md.metadata.name)
        ctx.cache.supersede(key, f"{KIND}/{md.metadata.name}", version_of({"metadata": meta}))
    return StatusWrite(written, version)


def scale_modeldeployment(
    md: ModelDeployment, replicas: int, version: str | None, ctx: OperatorContext
) -> None:
    """The autoscaler's count, through the scale subresource as an HPA writes it, and only
    onto the version this pass decided from and wrote: a count set meanwhile (``kubectl
    scale``) is a 409, and the round is decided again from it."""
    patch: Json = {"spec": {"replicas": replicas}}
    if version:
        patch["metadata"] = {"resourceVersion": version}
    ctx.api.merge_patch(
        API_VERSION,
        f"{KIND}/scale",
        md.metadata.namespace,
        md.metadata.name,
        patch,
        field_manager=AUTOSCALER_MANAGER,
    )
    key = (md.metadata.namespace, md.metadata.name)
    ctx.cache.supersede(key, f"{KIND}/{md.metadata.name}", version or "")


def apply_objects(
    md: ModelDeployment,
    desired: Sequence[Json],
    ctx: OperatorContext,
    observed: Mapping[str, Json | None],
) -> tuple[list[str], str | None]:
    """Apply those of ``desired`` that drifted from what was observed (read here when the
    snapshot does not hold it). Returns what was applied and the last refusal, which status
    reports as ApplyFailed."""
    applied: list[str] = []
    error: str | None = None
    ns = md.metadata.namespace
    for obj in desired:
        kind, name = obj["kind"], obj["metadata"]["name"]
        key = f"{kind}/{name}"
        current = (
            observed[key] if key in observed else ctx.api.get(obj["apiVersion"], kind, ns, name)
        )
        if not needs_apply(current, obj):
            continue
        try:
            written = apply_deployment(obj, current, ctx, f"{ns}/{md.metadata.name}")
        except ApiError as failure:
            # Reported in status (ApplyFailed) and retried on the next trigger or resync.
            error = Refusal(
                f"{kind} {ns}/{name} was refused ({failure.status}): {failure.message}",
                failure.status,
            )
            ctx.logger.warning(error, extra={"modeldeployment": f"{ns}/{md.metadata.name}"})
            continue
        if version_of(written) != version_of(current) and ctx.cache.holds(kind):
            # The cache shows the old one for now: passes read from the API server meanwhile.
            ctx.cache.supersede((ns, md.metadata.name), key, version_of(current))
        verb = "Created" if current is None else "Updated"
        ctx.logger.info(
            f"{verb} {kind} {ns}/{name}", extra={"modeldeployment": f"{ns}/{md.metadata.name}"}
        )
        applied.append(key)
    return applied, error


def apply_deployment(desired: Json, current: Json | None, ctx: OperatorContext, owner: str) -> Json:
    """Server-side apply, forced; for a Deployment, what apply cannot take back from hand
    edits is taken back after it (``take_back_template``). Apply is even refused (422) when
    our fields and the ones others added make an invalid whole (``privileged: true`` added
    beside our ``allowPrivilegeEscalation: false``): then the template is taken back first."""
    if desired["kind"] != "Deployment":
        return ctx.api.apply(desired)
    try:
        written = ctx.api.apply(desired)
    except ApiError as failure:
        if failure.status != 422 or current is None:
            raise
        meta = desired["metadata"]  # read fresh: the cache's copy may be a version behind
        there = ctx.api.get("apps/v1", "Deployment", meta["namespace"], meta["name"])
        if there is None or not others_in_template(there, FIELD_MANAGER):
            raise  # nobody else's fields: ours alone are refused, and status says why
        take_back_template(desired, there, ctx, owner)
        return ctx.api.apply(desired)
    if needs_apply(written, desired) and others_in_template(written, FIELD_MANAGER):
        written = take_back_template(desired, written, ctx, owner)
    return written


def take_back_template(desired: Json, written: Json, ctx: OperatorContext, owner: str) -> Json:
    """Server-side apply leaves what others added to a pod template (an env var, a port,
    ``privileged: true``) with them: it only takes back the fields we set. Those additions
    are undone here, with a merge patch from the template there to ours (removed keys as
    null, lists whole), preconditioned on the version the apply left."""
    meta = written["metadata"]
    ours = desired["spec"]["template"]["spec"]
    theirs = (written.get("spec") or {}).get("template", {}).get("spec") or {}
    patch: Json = {
        "metadata": {"resourceVersion": meta["resourceVersion"]},
        "spec": {"template": {"spec": merge_diff(theirs, ours)}},
    }
    ctx.logger.info(
        f"Took back fields others added to Deployment {meta['namespace']}/{meta['name']}",
        extra={"modeldeployment": owner},
    )
    return ctx.api.merge_patch("apps/v1", "Deployment", meta["namespace"], meta["name"], patch)


def carry_out(
    md: ModelDeployment,
    children: Children,
    ctx: OperatorContext,
    observed: Mapping[str, Json | None],
) -> tuple[list[str], str | None]:
    """Bring the children in line: applies, scales, deletes. Returns what changed and the
    last refusal."""
    ns, key = md.metadata.namespace, f"{md.metadata.namespace}/{md.metadata.name}"
    changed, error = apply_objects(md, children.apply, ctx, observed)
    for scale in children.scale:
        current = observed.get(f"Deployment/{scale.name}")
        if current is None or (current.get("spec") or {}).get("replicas") == scale.replicas:
            continue
        try:
            scaled = ctx.api.merge_patch(
                "apps/v1",
                "Deployment/scale",
                ns,
                scale.name,
                {"spec": {"replicas": scale.replicas}},
            )
        except ApiError as failure:
            error = Refusal(
                f"Deployment {ns}/{scale.name} could not be scaled"
                f" ({failure.status}): {failure.message}",
                failure.status,
            )
            continue
        if version_of(scaled) != version_of(current):
            ctx.cache.supersede(
                (ns, md.metadata.name), f"Deployment/{scale.name}", version_of(current)
            )
        ctx.logger.info(
            f"Scaled Deployment {ns}/{scale.name} to {scale.replicas}",
            extra={"modeldeployment": key},
        )
        changed.append(f"Deployment/{scale.name}")
    for api_version, kind, name in children.delete:
        if f"{kind}/{name}" in observed and observed[f"{kind}/{name}"] is None:
            continue
        if ctx.cache.holds(kind):
            ctx.cache.supersede(
                (ns, md.metadata.name),
                f"{kind}/{name}",
                version_of(observed.get(f"{kind}/{name}")),
            )
        ctx.api.delete(api_version, kind, ns, name)
        ctx.logger.info(f"Deleted {kind} {ns}/{name}", extra={"modeldeployment": key})
        changed.append(f"-{kind}/{name}")
    return changed, error


def emit_events(
    ctx: OperatorContext, involved: dict[str, Any], key: str, events: Sequence[EventSpec]
) -> None:
    """Post the Events; best effort, since status already tells the truth. An Event like
    one posted in the last 10 minutes patches that one's count; an object past its burst
    posts nothing for a while (``events.EventCorrelator``)."""
    meta = involved["metadata"]
    for event in events:
        similar = (f"{key}/{meta.get('uid', '')}", event.type, event.reason, event.message)
        write = ctx.events.decide(similar, ctx.epoch())
        if write is None:
            ctx.telemetry.events_dropped.labels(event.type, event.reason).inc()
            continue
        try:
            post_event(ctx, involved, event, similar, write)
        except ApiError as failure:
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


def post_event(
    ctx: OperatorContext,
    involved: dict[str, Any],
    event: EventSpec,
    similar: Similar,
    write: EventWrite,
) -> None:
    """Create the Event, or patch the similar one's count and last time."""
    if write.name is not None:
        patch = {"count": write.count, "lastTimestamp": ctx.clock()}
        namespace = involved["metadata"]["namespace"]
        try:
            ctx.api.merge_patch("v1", "Event", namespace, write.name, patch)
            return
        except ApiError as failure:
            if failure.status != 404:
                raise
            ctx.events.gone(similar)  # expired (Events live an hour): post a new one
    name = ctx.api.emit_event(involved, event.type, event.reason, event.message)
    ctx.events.created(similar, name)


def open_gates(md: ModelDeployment, pods: Sequence[str], ctx: OperatorContext) -> None:
    """Let canary pods past the serving gate (``SERVING_GATE``): Ready, so Services send
    them users. A refusal is logged; the pod stays out, and the next pass tries again."""
    ns, key = md.metadata.namespace, f"{md.metadata.namespace}/{md.metadata.name}"
    condition = {
        "type": SERVING_GATE,
        "status": "True",
        "reason": "ShadowStepsPassed",
        "message": "the rollout is past its shadow steps: this pod serves users",
        "lastTransitionTime": iso(ctx.epoch()),
    }
    for pod in pods:
        try:
            ctx.api.set_pod_condition(ns, pod, condition)
        except ApiError as failure:
            if failure.status != 404:  # gone meanwhile: nothing to open
                ctx.logger.warning(
                    f"could not open the serving gate of pod {ns}/{pod}: {failure}",
                    extra={"modeldeployment": key},
                )
            continue
        ctx.logger.info(
            f"Opened the serving gate of pod {ns}/{pod}", extra={"modeldeployment": key}
        )


def label_nodes(ctx: OperatorContext, labels: set[tuple[str, str]]) -> None:
    """The node cache's labels (``nodecache``), one merge patch each; recorded even when
    refused (RBAC without node patch: logged once), so no pass asks again."""
    for node, label in sorted(labels):
        try:
            ctx.api.merge_patch("v1", "Node", "", node, {"metadata": {"labels": {label: "true"}}})
        except ApiError as failure:
            ctx.logger.warning("could not label node %s with %s: %s", node, label, failure)
        ctx.node_labels.add((node, label))
