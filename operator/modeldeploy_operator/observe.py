"""Observe: everything one reconcile pass knows, read once, as plain data.

The snapshot holds the two track Deployments, the pods, the nodes' GPU products, missing
references and, when one is due, the canary's analysis. The autoscaler's round reads its
metrics here too (``scaling_readings``, ``idle``) and, only when it wants more GPU pods, the
capacity of the reachable GPUs (``gpu_capacity``). These are the reconcile path's only
Prometheus queries. Deciding (``rollout.plan``, ``autoscaling``, ``status``) works on what
they return; ``act`` writes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modeldeploy_operator.api.v1alpha1 import (
    API_VERSION,
    KIND,
    AnalysisMetric,
    AnalysisResult,
    AutoscalingSpec,
    ModelDeployment,
    parse_duration,
)
from modeldeploy_operator.autoscaling.capacity import replicas_that_fit
from modeldeploy_operator.autoscaling.decide import Reading
from modeldeploy_operator.builders.activation import Activator
from modeldeploy_operator.builders.autoscaler import cpu_cores, target_value
from modeldeploy_operator.builders.deployment import (
    API_KEYS_VOLUME,
    CREDENTIALS_VOLUME,
    build_deployment,
)
from modeldeploy_operator.builders.labels import (
    MD_LABEL,
    deployment_name,
    metric_selector,
    selector_string,
    service_name,
)
from modeldeploy_operator.cache import endpoints_of
from modeldeploy_operator.context import OperatorContext, ReferencesChecked
from modeldeploy_operator.k8s.client import ApiError
from modeldeploy_operator.metrics.prometheus import MetricsProvider, ProviderError
from modeldeploy_operator.promql import (
    BUILTIN_QUERIES,
    IDLE_QUERY,
    PER_OUTPUT,
    PER_REPLICA,
    SHADOW_BUILTINS,
    TemplateError,
    budget_usage_query,
    metric_name,
    query_of,
    render_query,
    variables,
)
from modeldeploy_operator.rollout.analysis import Measurement, assess, describe, verdict
from modeldeploy_operator.rollout.plan import (
    Check,
    World,
    analysis_due,
    in_shadow_step,
    iso,
    requested,
    track_state,
)
from modeldeploy_operator.status import MissingReference, pod_ready

Json = dict[str, Any]


@dataclass(frozen=True)
class Snapshot:
    """One pass's view of a ModelDeployment's world."""

    stable: Json | None
    canary: Json | None
    children: dict[str, Json | None]  # the children known, by ``Kind/name`` (None: absent)
    pods: tuple[Json, ...]
    world: World
    gpu_products: frozenset[str] | None
    missing: tuple[MissingReference, ...]
    budget_usage: dict[str, float] | None = None  # calls per key over the budget's window


def activator(ctx: OperatorContext) -> Activator | None:
    """The activator's Ready pods and ports (None: no activator configured): from its watch,
    or before that has listed, from the API server."""
    if ctx.activator_service is None:
        return None
    store = ctx.cache.activator
    if store is not None and store.listed.is_set():
        return Activator(*store.current())
    namespace, service = ctx.activator_service
    try:
        slices = ctx.api.list(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            namespace,
            f"kubernetes.io/service-name={service}",
        )
    except ApiError as error:
        ctx.logger.warning(f"The activator's endpoints could not be read: {error.message}")
        return None
    return Activator(*endpoints_of(slices))


REFERENCE_RECHECK_SECONDS = 10.0  # a pass this soon when a Secret or ConfigMap is missing
BUDGET_SECONDS = 30.0  # query budgets are summed this often


# The volume each Secret the spec names is mounted as, by the spec's field.
SECRET_VOLUMES = {
    "spec.model.credentialsSecret": CREDENTIALS_VOLUME,
    "spec.monitoring.auth.apiKeySecret": API_KEYS_VOLUME,
}
# The kubelet's Event when a Secret volume cannot be set up because the Secret is not there
# (older kubelets said "secrets").
FAILED_MOUNT = re.compile(r'volume "(?P<volume>[^"]+)" : secrets? "(?P<secret>[^"]+)" not found')


def references(md: ModelDeployment) -> tuple[tuple[str, str, str], ...]:
    """(kind, name, spec path) of each Secret and ConfigMap the spec names."""
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
    return tuple(wanted)


def missing_references(
    md: ModelDeployment, pods: tuple[Json, ...], ctx: OperatorContext
) -> tuple[MissingReference, ...]:
    """Secrets and ConfigMaps the spec names that do not exist, looked for only when the
    answer can have changed: a new spec, one missing at the last look (reconcile then asks
    for a pass within ``REFERENCE_RECHECK_SECONDS``), or a pod not Ready (a deleted Secret
    shows there first). At rest this costs no request.

    ConfigMaps are read as metadata only. Secrets are never read at all (the operator's
    account may not): a missing one is learned where it matters, from the kubelet's Events
    about a pod that waits for it (:func:`unmounted_secrets`)."""
    wanted = references(md)
    key = (md.metadata.namespace, md.metadata.name)
    last = ctx.references.get(key)
    if not wanted:
        ctx.references.pop(key, None)
        return ()
    if (
        last is not None
        and last.generation == md.metadata.generation
        and not last.missing
        and pods
        and all(pod_ready(p) for p in pods)
    ):
        return ()
    unmounted = unmounted_secrets(wanted, pods, md.metadata.namespace, ctx)
    missing = tuple(
        MissingReference(kind, name, path)
        for kind, name, path in wanted
        if (kind == "Secret" and path in unmounted)
        or (kind == "ConfigMap" and not ctx.api.exists("v1", kind, md.metadata.namespace, name))
    )
    ctx.references[key] = ReferencesChecked(md.metadata.generation, missing)
    return missing


def waits_for_volumes(pod: Mapping[str, Any]) -> bool:
    """Scheduled, not going, and none of its containers started yet: the kubelet sets up a
    pod's volumes before it creates its first container."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Pending":
        return False
    if not (pod.get("spec") or {}).get("nodeName"):
        return False
    containers = [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]
    return all(
        "waiting" in (c.get("state") or {}) and not c.get("restartCount") for c in containers
    )


def unmounted_secrets(
    wanted: tuple[tuple[str, str, str], ...],
    pods: tuple[Json, ...],
    namespace: str,
    ctx: OperatorContext,
) -> frozenset[str]:
    """The spec fields of the Secrets the kubelet could not mount, because they do not exist,
    into the first of the pods that wait for their volumes: its FailedMount Events say so
    (``MountVolume.SetUp failed for volume "api-keys" : secret "keys" not found``). One
    request, and only while a pod waits. Until a pod is scheduled a missing Secret is not
    known; once created, it is reported until the kubelet's next try mounts it (its retries
    back off to about 2 minutes)."""
    volumes = {
        SECRET_VOLUMES[path]: (name, path) for kind, name, path in wanted if kind == "Secret"
    }
    waiting = [p for p in pods if waits_for_volumes(p)]
    if not volumes or not waiting:
        return frozenset()
    found = set()
    for event in ctx.api.events_of(namespace, "Pod", waiting[0]["metadata"]["name"]):
        failed = FAILED_MOUNT.search(str(event.get("message") or ""))
        if event.get("reason") != "FailedMount" or failed is None:
            continue
        name, path = volumes.get(failed["volume"], ("", ""))
        if name == failed["secret"]:
            found.add(path)
    return frozenset(found)


def measure(md: ModelDeployment, ctx: OperatorContext, now: float, revision: str = "") -> Check:
    """Run the canary's analysis queries once. Unreachable Prometheus, bad templates and
    "no data" are inconclusive, never success. The shadow builtins count in shadow steps
    only; the others in every step (in a shadow step, on the canary's copied requests)."""
    analysis = md.spec.rollout.analysis if md.spec.rollout else None
    if analysis is None:
        return Check("Inconclusive", "no analysis configured", (), now)
    interval = parse_duration(analysis.interval)
    url = analysis.prometheus.url if analysis.prometheus else ctx.prometheus_url
    variables = {
        "selector": metric_selector(md),
        "interval": f"{max(int(interval), 1)}s",
        "namespace": md.metadata.namespace,
        "name": md.metadata.name,
        "revision": revision,
    }
    measurements = []
    shadowing = in_shadow_step(md, revision)
    for metric in analysis.metrics:
        if metric.builtin in SHADOW_BUILTINS and not shadowing:
            continue
        try:
            if not url:
                raise ProviderError("no Prometheus URL (spec.rollout.analysis.prometheus.url)")
            query = render_query(metric.query or BUILTIN_QUERIES[metric.builtin or ""], variables)
            if metric.builtin in PER_OUTPUT:
                measurements.append(worst_output(metric, ctx.metrics_provider(url), query))
                continue
            value = ctx.metrics_provider(url).query(query)
            measurements.append(Measurement(metric.name, value, metric.min, metric.max))
        except (ProviderError, TemplateError, KeyError) as error:
            measurements.append(
                Measurement(metric.name, None, metric.min, metric.max, error=str(error))
            )
    result, decisive = verdict(measurements)
    results = tuple(
        AnalysisResult(
            name=m.name,
            value=m.value,
            min=m.min,
            max=m.max,
            result=assess(m),
            time=iso(now),
            detail=m.detail or None,
        )
        for m in measurements
    )
    message = describe(decisive) if decisive else "all metrics within bounds"
    return Check(result, message, results, now)


def worst_output(metric: AnalysisMetric, provider: MetricsProvider, query: str) -> Measurement:
    """A per-output shadow metric: the output furthest past its bounds (the largest value;
    NaN, an output with no rows in the window, is left out), named in the message."""
    values = {k: v for k, v in provider.query_by(query, "output").items() if not math.isnan(v)}
    if not values:
        return Measurement(metric.name, None, metric.min, metric.max)
    output, value = max(values.items(), key=lambda item: (item[1], item[0]))
    return Measurement(metric.name, value, metric.min, metric.max, detail=f"output {output}")


def scaling_readings(
    md: ModelDeployment, spec: AutoscalingSpec, ctx: OperatorContext, url: str | None
) -> tuple[Reading, ...]:
    """Each autoscaling metric's value now; no data (None) when Prometheus cannot say."""
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
    return tuple(readings)


def idle(md: ModelDeployment, idle_for: float, ctx: OperatorContext, url: str | None) -> bool:
    """No requests reached any sidecar for ``idle_for`` seconds (no data is not idle)."""
    if not url:
        return False
    query = render_query(IDLE_QUERY, {**variables(md), "idle": f"{int(idle_for)}s"})
    try:
        value = ctx.metrics_provider(url).query(query)
    except ProviderError:
        return False
    return value is not None and value == 0


def gpu_capacity(md: ModelDeployment, ctx: OperatorContext, revision: str) -> int | None:
    """Replicas the reachable GPUs hold; None without GPUs or without the right to list.
    Read only when the autoscaler wants more GPU pods: it lists every node and pod."""
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


def snapshot(
    md: ModelDeployment,
    annotations: Mapping[str, str] | None,
    revision: str,
    ctx: OperatorContext,
    now: float,
) -> Snapshot:
    """Read what this pass needs, once: from the watches' cache, or before it is filled from
    the API server."""
    ns = md.metadata.namespace
    names = [f"Deployment/{deployment_name(md, t)}" for t in ("stable", "canary")]
    children: dict[str, Json | None]
    cached: dict[str, Json | None] = {}
    if ctx.cache.ready:
        expected = (*names, f"Service/{service_name(md)}", *ctx.cache.expected(md.metadata.name))
        cached = dict.fromkeys(expected)
        cached.update(ctx.cache.children(ns, md.metadata.name))
    if cached and not ctx.cache.outdated((ns, md.metadata.name), cached):
        children = cached
        pods = ctx.cache.pods(ns, md.metadata.name)
    else:  # before the watches have listed everything, or right after our own writes
        children = {
            name: ctx.api.get("apps/v1", "Deployment", ns, name.split("/", 1)[1]) for name in names
        }
        pods = tuple(ctx.api.list("v1", "Pod", ns, selector_string(md)))
    stable, canary = children[names[0]], children[names[1]]
    world = World(
        stable=track_state(stable, pods, "stable"),
        canary=track_state(canary, pods, "canary"),
        command=requested(annotations),
    )
    if analysis_due(md, revision, world, now):
        world = World(world.stable, world.canary, world.command, measure(md, ctx, now, revision))
    return Snapshot(
        stable=stable,
        canary=canary,
        children=children,
        pods=pods,
        world=world,
        gpu_products=ctx.gpus.products() if md.spec.resources.gpu else None,
        missing=missing_references(md, pods, ctx),
        budget_usage=budget_usage(md, ctx),
    )


def budget_usage(md: ModelDeployment, ctx: OperatorContext) -> dict[str, float] | None:
    """Each API key's inference calls over the query budget's window, summed over every
    replica by Prometheus; None when there is no budget or it cannot be read (the sidecars
    then go on with the last list, and their own exact count of what each pod admitted)."""
    auth = md.spec.monitoring.auth
    if auth is None or auth.query_budget is None or not md.spec.monitoring.runtime.enabled:
        return None
    if ctx.prometheus_url is None:
        return None
    try:
        return ctx.metrics_provider(ctx.prometheus_url).query_by(budget_usage_query(md), "client")
    except ProviderError as error:
        ctx.logger.warning(
            f"Query budgets could not be summed: {error}",
            extra={"modeldeployment": f"{md.metadata.namespace}/{md.metadata.name}"},
        )
        return None


def modeldeployment(ctx: OperatorContext, namespace: str, name: str) -> Json | None:
    """The ModelDeployment as the watch last saw it; from the API server before the cache is
    filled, or while the cached copy is one this operator has written over (or got a 409
    on). Otherwise a stale copy is safe: every status write is preconditioned on the
    resourceVersion it was decided from."""
    if not ctx.cache.ready:
        return ctx.api.get(API_VERSION, KIND, namespace, name)
    cached = ctx.cache.modeldeployment(namespace, name)
    if cached is None or ctx.cache.outdated((namespace, name), {f"ModelDeployment/{name}": cached}):
        # Not yet seen by kopf's watch (a child's event came first), or written over.
        return ctx.api.get(API_VERSION, KIND, namespace, name)
    return cached
