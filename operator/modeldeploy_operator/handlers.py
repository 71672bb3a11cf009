"""kopf wiring: the only module that imports kopf. Handlers are thin; all call reconcile.

Only watch-event handlers are used, no change handlers, timers or daemons: kopf then keeps no
state on our objects (no annotations, no finalizers, no status fields), so deleting a
ModelDeployment never waits for the operator, and restarts cost no writes. The initial
listing of every watch is the "resume"; the periodic resync in ``__main__`` is the timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import kopf

from modeldeploy_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from modeldeploy_operator.builders.labels import MANAGED_BY_LABEL, MANAGER, MD_LABEL
from modeldeploy_operator.context import OperatorContext
from modeldeploy_operator.k8s.client import Connection
from modeldeploy_operator.reconcile import Reconciler

CHILDREN = (("apps", "v1", "deployments"), ("v1", "services"), ("v1", "pods"))


def build_registry(
    reconciler: Reconciler, connection: Connection, stop: asyncio.Event
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.cleanup(registry=registry)
    def stopping(**_: Any) -> None:
        # kopf handles SIGINT/SIGTERM itself and then waits up to 5 s for every other task of
        # the loop to end: tell the resync timer now.
        stop.set()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # we post our own Events, on transitions only
        settings.peering.standalone = True
        settings.watching.server_timeout = 300
        settings.execution.max_workers = 8

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
    def modeldeployment_changed(type: str, name: str, namespace: str | None, **_: Any) -> None:
        if namespace is None:
            return
        if type == "DELETED":
            reconciler.forget(namespace, name)  # children go with it: owner references
            return
        reconciler.trigger(namespace, name)

    for resource in CHILDREN:

        @kopf.on.event(
            *resource,
            id=f"child-{resource[-1]}",
            labels={MANAGED_BY_LABEL: MANAGER},
            registry=registry,
        )
        def child_changed(labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
            owner = labels.get(MD_LABEL)
            if owner and namespace:
                reconciler.trigger(namespace, owner)

    return registry


async def serve(
    reconciler: Reconciler,
    ctx: OperatorContext,
    *,
    connection: Connection,
    namespaces: tuple[str, ...],
    liveness_endpoint: str,
    stop: asyncio.Event,
) -> None:
    """Run kopf's watches until ``stop`` is set; every namespace when none are given."""
    scope: dict[str, Any] = {"namespaces": namespaces} if namespaces else {"clusterwide": True}
    await kopf.operator(
        registry=build_registry(reconciler, connection, stop),
        memo=ctx,
        standalone=True,
        liveness_endpoint=liveness_endpoint,
        stop_flag=stop,
        **scope,
    )
