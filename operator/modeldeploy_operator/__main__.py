"""``python -m modeldeploy_operator`` / ``modeldeploy-operator``: run the operator."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Sequence

from prometheus_client import start_http_server

from modeldeploy_operator import __version__, handlers, logs
from modeldeploy_operator.api.v1alpha1 import API_VERSION, KIND
from modeldeploy_operator.builders.deployment import BuildConfig
from modeldeploy_operator.context import GpuInventory, OperatorContext
from modeldeploy_operator.k8s.client import KubernetesApi, connection_of, load_api_client
from modeldeploy_operator.reconcile import Reconciler
from modeldeploy_operator.telemetry import Telemetry

DEFAULT_RUNTIME_IMAGE = f"ghcr.io/modeldeploy/runtime:{__version__.split('+')[0]}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="modeldeploy-operator", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (default)"
    )
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)"
    )
    parser.add_argument(
        "--runtime-image",
        default=DEFAULT_RUNTIME_IMAGE,
        help="image of the model fetcher and sidecar",
    )
    parser.add_argument(
        "--prometheus-url",
        help="Prometheus for canary analysis and autoscaling when a ModelDeployment names none",
    )
    parser.add_argument(
        "--resync-seconds", type=float, default=30.0, help="periodic full reconcile"
    )
    parser.add_argument(
        "--bind-address",
        default="0.0.0.0",  # noqa: S104 - in a pod, probes and Prometheus come from outside
        help="address of the metrics and health endpoints",
    )
    parser.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics")
    parser.add_argument("--health-port", type=int, default=8081, help="liveness /healthz")
    parser.add_argument("--log-format", choices=["json", "text"], default="json")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


async def resync(reconciler: Reconciler, ctx: OperatorContext, stop: asyncio.Event) -> None:
    """The timer: reconcile every ModelDeployment every ``resync_seconds``."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=ctx.resync_seconds)
        if stop.is_set():
            return
        for namespace in ctx.namespaces or (None,):
            try:
                items = await asyncio.to_thread(ctx.api.list, API_VERSION, KIND, namespace)
            except Exception:
                ctx.logger.exception("Could not list ModelDeployments for the resync")
                continue
            for item in items:
                meta = item["metadata"]
                try:
                    await asyncio.to_thread(reconciler.trigger, meta["namespace"], meta["name"])
                except Exception:
                    ctx.logger.exception(
                        "Reconcile failed",
                        extra={"modeldeployment": f"{meta['namespace']}/{meta['name']}"},
                    )


async def requeue(reconciler: Reconciler, ctx: OperatorContext, stop: asyncio.Event) -> None:
    """Reconcile objects at the times they asked for (a canary's next analysis or pause end),
    so rollouts do not wait for the resync timer."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.25)
        for namespace, name in reconciler.due(time.monotonic()):
            try:
                await asyncio.to_thread(reconciler.trigger, namespace, name)
            except Exception:
                ctx.logger.exception(
                    "Reconcile failed", extra={"modeldeployment": f"{namespace}/{name}"}
                )


async def run(args: argparse.Namespace, logger: logging.Logger) -> None:
    telemetry = Telemetry()
    api_client = load_api_client(args.kubeconfig)
    api = KubernetesApi(api_client, on_request=telemetry.count_request)
    ctx = OperatorContext(
        api=api,
        build=BuildConfig(runtime_image=args.runtime_image),
        telemetry=telemetry,
        gpus=GpuInventory(api),
        logger=logger,
        resync_seconds=args.resync_seconds,
        prometheus_url=args.prometheus_url,
        namespaces=tuple(args.namespace),
    )
    reconciler = Reconciler(ctx)
    start_http_server(args.metrics_port, addr=args.bind_address, registry=telemetry.registry)
    stop = asyncio.Event()  # set by kopf's cleanup handler on SIGINT/SIGTERM; ends the timer
    logger.info(
        "Starting modeldeploy operator",
        extra={"version": __version__, "namespaces": args.namespace or "all"},
    )
    timer = asyncio.create_task(resync(reconciler, ctx, stop))
    waker = asyncio.create_task(requeue(reconciler, ctx, stop))
    try:
        await handlers.serve(
            reconciler,
            ctx,
            namespaces=tuple(args.namespace),
            connection=connection_of(api_client),
            liveness_endpoint=f"http://{args.bind_address}:{args.health_port}/healthz",
            stop=stop,
        )
    finally:  # kopf returns on SIGINT/SIGTERM (its own handlers or our stop flag)
        stop.set()
        for task in (timer, waker):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    logger.info("Stopped modeldeploy operator")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logger = logs.configure(args.log_format, args.log_level)
    asyncio.run(run(args, logger))
    return 0


if __name__ == "__main__":
    sys.exit(main())
