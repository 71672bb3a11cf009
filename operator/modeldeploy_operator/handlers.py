"""The watches: kopf's, of the ModelDeployments, and one reflector per child kind. This is
the only module that imports kopf. Handlers are thin: they add the ModelDeployment's key to
the work queue and return (``Reconciler.add``, a short lock), so they are coroutines on
kopf's event loop and kopf's own thread pool stays small; the queue's workers reconcile.

The watches keep the operator's cache (``cache.py``): kopf's event handler hands over each
ModelDeployment; the reflectors (``k8s/reflector.py``, list then watch, filtered by label on
the server) keep their Deployments, Services and pods, projected to the fields the operator
reads. The operator starts reconciling once every reflector has listed once.

An event enqueues only when it changed something the operator reads: for a child or a pod,
its projection (``KindStore``); for a ModelDeployment, its spec, labels, annotations or
deletion, not its status, which is the operator's own write coming back
(``ClusterCache.note``/``relevant``).

Only watch-event handlers are used, no change handlers, timers or daemons: kopf then keeps no
state on our objects (no annotations, no finalizers, no status fields), so deleting a
ModelDeployment never waits for the operator, and restarts cost no writes. The initial
listing of every watch is the "resume"; the periodic resync in ``__main__`` is the timer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Mapping
from typing import Any, cast

import kopf

from modeldeploy_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from modeldeploy_operator.builders.labels import MANAGED_BY_LABEL, MANAGER, MD_LABEL
from modeldeploy_operator.cache import ClusterCache, trigger_of
from modeldeploy_operator.context import OperatorContext
from modeldeploy_operator.k8s.client import Connection
from modeldeploy_operator.k8s.reflector import Contact, Reflector, WatchApi, WatchTiming
from modeldeploy_operator.reconcile import Reconciler
from modeldeploy_operator.rollout.plan import COMMAND_ANNOTATION

# Reflected kinds: what the operator makes (a deleted or edited one is seen at once, not on the
# next resync), and the pods it reads. The custom kinds only when their CRDs are installed.
CHILDREN = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "Pod"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("discovery.k8s.io/v1", "EndpointSlice"),  # of our Services: the labels are copied
)
OPTIONAL_CHILDREN = (
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
)
OWNED = f"{MANAGED_BY_LABEL}={MANAGER}"  # the server-side label selector of child watches


def urgent(body: Mapping[str, Any]) -> bool:
    """A spec not yet reconciled, or a manual command: ahead of follow-up passes."""
    meta = body.get("metadata") or {}
    observed = (body.get("status") or {}).get("observedGeneration")
    return observed != meta.get("generation") or COMMAND_ANNOTATION in (
        meta.get("annotations") or {}
    )


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf diffs each event's object against its last handled state, for change handlers,
    and builds that state (a deep copy of the body) on every event whatever the handlers.
    This operator registers no change handlers, so there is nothing to diff: the copy was a
    sixth of the operator's CPU in a cold start of 1,000 objects (py-spy)."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def build_registry(
    reconciler: Reconciler,
    connection: Connection,
    stop: asyncio.Event,
    api_timeout: float = 10.0,
    timing: WatchTiming | None = None,
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    watching = timing or WatchTiming()
    cache: ClusterCache = reconciler.ctx.cache

    @kopf.on.cleanup(registry=registry)
    def stopping(**_: Any) -> None:
        # kopf handles SIGINT/SIGTERM itself and then waits up to 5 s for every other task of
        # the loop to end: tell the resync timer now.
        stop.set()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        settings.posting.enabled = False  # we post our own Events, on transitions only
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.peering.standalone = True
        settings.watching.server_timeout = watching.watch_seconds
        # A dead API server or a half-open connection must not hang a watch forever: connect
        # within --api-timeout, and give up on a stream the server should have ended.
        settings.networking.connect_timeout = api_timeout
        settings.watching.connect_timeout = api_timeout
        settings.watching.client_timeout = settings.watching.server_timeout + 60
        # A silent stream (no event, no bookmark: they come about every minute) is dead: kopf
        # resumes it from its last resourceVersion, as our reflectors do.
        settings.watching.inactivity_timeout = watching.inactivity_seconds
        # Only these start-up, login and cleanup handlers are synchronous: the event handlers
        # only enqueue, on the loop.
        settings.execution.max_workers = 2

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        """The credentials the operator loaded (--kubeconfig or in-cluster), not kopf's guess."""
        return kopf.ConnectionInfo(
            server=connection.server,
            ca_path=connection.ca_path,
            insecure=connection.insecure,
            certificate_path=connection.certificate_path,
            private_key_path=connection.private_key_path,
            scheme="Bearer" if connection.token else None,
            token=connection.token,
        )

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def modeldeployment_changed(
        type: str | None,
        body: kopf.Body,
        name: str,
        namespace: str | None,
        uid: str | None,
        **_: Any,
    ) -> None:
        if namespace is None:
            return
        seen = uid or f"{namespace}/{name}"
        if type == "DELETED":
            cache.drop(namespace, name)
        else:
            cache.put(body)
            cache.note(seen, trigger_of(body))
        if not cache.relevant(seen, type):
            return
        if type == "DELETED":
            reconciler.forget(namespace, name)  # children go with it: owner references
            return
        reconciler.add(namespace, name, urgent=urgent(body))

    return registry


def start_reflectors(
    reconciler: Reconciler,
    api: WatchApi,
    namespaces: tuple[str, ...],
    stop: threading.Event,
    contact: Contact,
    timing: WatchTiming,
) -> None:
    """One reflector per child kind (per namespace when the operator watches some), filling
    the cache's stores, each in a daemon thread; a change to what a pass reads enqueues the
    object's ModelDeployment. ``contact`` learns when each last heard from the server."""
    ctx = reconciler.ctx
    telemetry = ctx.telemetry

    def changed(owner: tuple[str, str]) -> None:
        reconciler.add(*owner)

    def failed(message: str) -> None:
        ctx.logger.warning(message)

    kinds = list(CHILDREN)
    for api_version, kind in OPTIONAL_CHILDREN:
        if api.served(api_version, kind):
            kinds.append((api_version, kind))
        else:  # read from the API server when needed; drift of them is seen on the resync
            ctx.logger.info(f"{kind} is not served (no CRD): not watched")
    for api_version, kind in kinds:
        store = ctx.cache.store(kind, MD_LABEL, changed)
        for namespace in namespaces or (None,):
            reflector = Reflector(
                api,
                (api_version, kind, namespace),
                store,
                selector=OWNED,
                stop=stop,
                on_error=failed,
                on_stall=lambda watch: telemetry.watch_stalls.labels(watch).inc(),
                on_relist=lambda watch, why: telemetry.watch_relists.labels(watch, why).inc(),
                contact=contact,
                inactivity_seconds=timing.inactivity_seconds,
                watch_seconds=timing.watch_seconds,
            )
            thread = threading.Thread(
                target=reflector.run, name=f"watch-{kind.lower()}", daemon=True
            )
            thread.start()
    if ctx.activator_service is not None:
        start_activator_reflector(reconciler, api, stop, contact, timing)


def start_activator_reflector(
    reconciler: Reconciler,
    api: WatchApi,
    stop: threading.Event,
    contact: Contact,
    timing: WatchTiming,
) -> None:
    """Watch the activator Service's EndpointSlices: when its Ready pods change, every
    ModelDeployment that scales to zero gets a pass (its activator slice lists them)."""
    ctx = reconciler.ctx
    assert ctx.activator_service is not None  # noqa: S101 - the caller checked
    namespace, service = ctx.activator_service

    def changed() -> None:
        known = ctx.cache.keys()
        for key in known:
            body = ctx.cache.modeldeployment(*key) or {}
            zero = (((body.get("spec") or {}).get("autoscaling") or {}).get("scaleToZero")) or {}
            if zero.get("enabled"):
                reconciler.add(*key)

    reflector = Reflector(
        api,
        ("discovery.k8s.io/v1", "EndpointSlice", namespace),
        ctx.cache.watch_activator(changed),
        selector=f"kubernetes.io/service-name={service}",
        stop=stop,
        on_error=ctx.logger.warning,
        on_stall=lambda watch: ctx.telemetry.watch_stalls.labels(watch).inc(),
        on_relist=lambda watch, why: ctx.telemetry.watch_relists.labels(watch, why).inc(),
        contact=contact,
        inactivity_seconds=timing.inactivity_seconds,
        watch_seconds=timing.watch_seconds,
    )
    threading.Thread(target=reflector.run, name="watch-activator", daemon=True).start()


async def serve(
    reconciler: Reconciler,
    ctx: OperatorContext,
    *,
    connection: Connection,
    namespaces: tuple[str, ...],
    stop: asyncio.Event,
    liveness_endpoint: str | None = None,
    timing: WatchTiming | None = None,
) -> None:
    """Run kopf's watches until ``stop`` is set; every namespace when none are given. The
    operator serves its own /healthz (``health.py``): no ``liveness_endpoint`` by default."""
    scope: dict[str, Any] = {"namespaces": namespaces} if namespaces else {"clusterwide": True}
    await kopf.operator(
        registry=build_registry(reconciler, connection, stop, ctx.api_timeout, timing),
        memo=ctx,
        standalone=True,
        liveness_endpoint=liveness_endpoint,
        stop_flag=stop,
        **scope,
    )
