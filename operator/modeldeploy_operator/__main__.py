"""``python -m modeldeploy_operator`` / ``modeldeploy-operator``: run the operator."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

from prometheus_client import disable_created_metrics, start_http_server

from modeldeploy_operator import __version__, handlers, logs
from modeldeploy_operator.api.v1alpha1 import API_VERSION, KIND
from modeldeploy_operator.builders.deployment import BuildConfig
from modeldeploy_operator.context import GpuInventory, OperatorContext
from modeldeploy_operator.health import HealthServer
from modeldeploy_operator.k8s import client as k8s_client
from modeldeploy_operator.k8s import faults
from modeldeploy_operator.k8s.client import (
    ApiClient,
    KubeApi,
    KubernetesApi,
    KubernetesLeases,
    connection_of,
    load_api_client,
)
from modeldeploy_operator.k8s.reflector import (
    INACTIVITY_SECONDS,
    WATCH_SECONDS,
    Contact,
    WatchTiming,
)
from modeldeploy_operator.leader.decide import Timing
from modeldeploy_operator.leader.elector import (
    LEASE_NAME,
    LeaderElector,
    LeaderOnlyApi,
    default_namespace,
    new_identity,
)
from modeldeploy_operator.metrics import prometheus
from modeldeploy_operator.metrics.prometheus import PrometheusProvider
from modeldeploy_operator.reconcile import Reconciler
from modeldeploy_operator.telemetry import Telemetry

DEFAULT_RUNTIME_IMAGE = f"ghcr.io/modeldeploy/runtime:{__version__.split('+')[0]}"
CACHE_SYNC_SECONDS = 120.0  # reconciling waits this long at most for the first lists
WORKER_STOP_SECONDS = 5.0  # how long SIGTERM waits for the reconciles that run
USER_AGENT = "modeldeploy-operator"  # with the version and, when electing, the identity


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


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
        "--model-cache-dir",
        help="a node folder (hostPath) where fetchers keep oci:// model layers by digest, so"
        " a second replica, a restart or a rollback on the node skips the download",
    )
    parser.add_argument(
        "--model-cache-max-bytes",
        type=int,
        default=100 * 2**30,
        help="the node cache's size; least recently used layers go first",
    )
    parser.add_argument(
        "--activator-service",
        type=namespaced_name,
        help="NAMESPACE/NAME of the activator's Service: a scaled-to-zero ModelDeployment's"
        " callers are routed to its pods, which hold them and wake the model (the chart sets"
        " it); without it nothing wakes a model at zero",
    )
    parser.add_argument(
        "--prometheus-url",
        help="Prometheus for canary analysis and autoscaling when a ModelDeployment names none",
    )
    parser.add_argument(
        "--prometheus-timeout",
        type=positive_seconds,
        default=prometheus.DEFAULT_TIMEOUT,
        help="seconds a Prometheus query may take (default %(default)s)",
    )
    parser.add_argument(
        "--api-timeout",
        type=positive_seconds,
        default=k8s_client.DEFAULT_TIMEOUT[1],
        help="seconds to connect to, and then to wait for, the Kubernetes API server per"
        " request (default %(default)s)",
    )
    parser.add_argument(
        "--watch-inactivity-timeout",
        type=positive_seconds,
        default=INACTIVITY_SECONDS,
        help="a watch that hears nothing (no event, no bookmark: the API server sends one"
        " about every minute) for this long is dropped and resumed, and /healthz fails while"
        " one stays silent past it (seconds)",
    )
    parser.add_argument(
        "--watch-timeout",
        type=positive_int,
        default=WATCH_SECONDS,
        help="the API server ends each watch after between this and twice it (seconds); the"
        " watch then resumes where it was",
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=30.0,
        help="how often every ModelDeployment is added to the work queue",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=4,
        help="worker threads that reconcile (different) ModelDeployments in parallel"
        " (default %(default)s)",
    )
    parser.add_argument(
        "--reconcile-budget-seconds",
        type=positive_seconds,
        default=30.0,
        help="a reconcile of one ModelDeployment that takes longer is logged and counted"
        " (default %(default)s)",
    )
    parser.add_argument(
        "--bind-address",
        default="0.0.0.0",  # noqa: S104 - in a pod, probes and Prometheus come from outside
        help="address of the metrics and health endpoints",
    )
    parser.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics")
    parser.add_argument("--health-port", type=int, default=8081, help="liveness /healthz")
    parser.add_argument(
        "--reconcile-stall-seconds",
        type=float,
        default=300.0,
        help="/healthz fails when one reconcile has run longer than this",
    )
    parser.add_argument(
        "--crash-after-writes",
        type=int,
        default=int(os.environ[faults.ENVIRONMENT]) if os.environ.get(faults.ENVIRONMENT) else None,
        help=argparse.SUPPRESS,  # tests only (k8s/faults.py): exit before write N+1
    )
    parser.add_argument(
        "--watch-server",
        default=None,
        help=argparse.SUPPRESS,  # tests only (k8s/faults.py): kopf's watch through a relay
    )
    election = parser.add_argument_group("leader election (a coordination.k8s.io/v1 Lease)")
    election.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reconcile only while holding the Lease, so replicas can stand by",
    )
    election.add_argument(
        "--leader-election-namespace",
        help="namespace of the Lease (default: the pod's own, or `default` outside a pod)",
    )
    election.add_argument(
        "--leader-election-lease-duration",
        type=positive_seconds,
        default=Timing.lease_duration,
        metavar="SECONDS",
        help="how long standbys wait after the last renewal before taking over",
    )
    election.add_argument(
        "--leader-election-renew-deadline",
        type=positive_seconds,
        default=Timing.renew_deadline,
        metavar="SECONDS",
        help="how long the leader keeps acting without a successful renewal, then exits",
    )
    election.add_argument(
        "--leader-election-retry-period",
        type=positive_seconds,
        default=Timing.retry_period,
        metavar="SECONDS",
        help="how often candidates try and the leader renews",
    )
    parser.add_argument("--log-format", choices=["json", "text"], default="json")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        args.timing = Timing(
            lease_duration=args.leader_election_lease_duration,
            renew_deadline=args.leader_election_renew_deadline,
            retry_period=args.leader_election_retry_period,
        )
    except ValueError as error:
        parser.error(str(error))
    return args


async def resync(reconciler: Reconciler, ctx: OperatorContext, stop: asyncio.Event) -> None:
    """The timer: every ``resync_seconds``, add every ModelDeployment to the work queue (the
    workers reconcile them in parallel; a requeue-after or a retry needs no timer: the queue
    holds it)."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=ctx.resync_seconds)
        if stop.is_set():
            return
        keys = ctx.cache.keys() if ctx.cache.ready else []
        if not ctx.cache.ready:  # the watches have not listed everything yet
            for namespace in ctx.namespaces or (None,):
                try:
                    items = await asyncio.to_thread(ctx.api.list, API_VERSION, KIND, namespace)
                except Exception:
                    ctx.logger.exception("Could not list ModelDeployments for the resync")
                    continue
                keys += [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in items]
        for namespace, name in keys:
            reconciler.add(namespace, name)


async def watch_children(
    reconciler: Reconciler,
    ctx: OperatorContext,
    api_client: ApiClient,
    args: argparse.Namespace,
    stop: asyncio.Event,
    contact: Contact,
) -> threading.Event:
    """Start the child reflectors and wait for their first lists (a pass before them would
    read from the API server, or decide from a partial cache), for up to
    ``CACHE_SYNC_SECONDS`` or a stop. Returns the event that stops them."""
    reflectors = threading.Event()
    handlers.start_reflectors(
        reconciler,
        KubernetesApi(
            api_client,
            on_request=ctx.telemetry.count_request,
            timeout=(args.api_timeout, args.api_timeout),
        ),
        tuple(args.namespace),
        reflectors,
        contact,
        watch_timing(args),
    )
    deadline = time.monotonic() + CACHE_SYNC_SECONDS
    while not stop.is_set() and time.monotonic() < deadline:
        if await asyncio.to_thread(ctx.cache.wait_ready, 0.5):
            return reflectors
    if not stop.is_set():
        ctx.logger.warning(
            "The child watches have not listed everything yet; passes read from the API"
            " server until they have"
        )
    return reflectors


def namespaced_name(value: str) -> tuple[str, str]:
    namespace, _, name = value.partition("/")
    if not namespace or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAMESPACE/NAME")
    return namespace, name


def watch_timing(args: argparse.Namespace) -> WatchTiming:
    return WatchTiming(args.watch_inactivity_timeout, args.watch_timeout)


def health_check(
    reconciler: Reconciler,
    elector: LeaderElector | None,
    loops: list[asyncio.Task[None]],
    stall_seconds: float,
    contact: Contact,
    inactivity_seconds: float,
) -> str | None:
    """Why the operator cannot do its work, or None. A standby is healthy while it campaigns;
    a leader is not when a reconcile has been stuck past the budget, a loop or a worker
    thread died, or a watch has heard nothing from the API server past its inactivity
    timeout (a stalled stream that resuming did not cure)."""
    if elector is not None and not elector.leading:
        return None
    for task in loops:
        if task.done():
            return f"the {task.get_name()} loop ended"
    dead = reconciler.dead_workers()
    if dead:
        return f"the worker thread {dead[0]} ended"
    running = reconciler.longest_running(time.monotonic())
    if running is not None and running[1] > stall_seconds:
        (namespace, name), seconds = running
        return f"the reconcile of {namespace}/{name} has run for {seconds:.0f} s"
    silent = {w: s for w, s in contact.silence().items() if s > inactivity_seconds}
    if silent:
        watch, seconds = max(silent.items(), key=lambda item: item[1])
        return f"the {watch} watch has heard nothing from the API server for {seconds:.0f} s"
    return None


def exit_after(seconds: float, code: int) -> None:
    """Exit the process ``seconds`` from now however shutdown goes (a thread blocked in a
    request would otherwise hold it): client-go's OnStoppedLeading exits too."""
    timer = threading.Timer(seconds, os._exit, args=(code,))
    timer.daemon = True
    timer.start()


def build_context(
    args: argparse.Namespace,
    api_client: ApiClient,
    telemetry: Telemetry,
    logger: logging.Logger,
    leading: Callable[[], bool] | None = None,
) -> OperatorContext:
    """The operator's context from its flags; no I/O. With ``leading``, every write is
    refused once it says the Lease is lost."""
    api: KubeApi = KubernetesApi(
        api_client,
        on_request=telemetry.count_request,
        timeout=(args.api_timeout, args.api_timeout),
    )
    if leading is not None:
        api = LeaderOnlyApi(api, leading)  # no write once the Lease is lost
    if args.crash_after_writes is not None:  # tests only: die between two writes
        api = LeaderOnlyApi(api, faults.CrashAfterWrites(args.crash_after_writes))
    return OperatorContext(
        api=api,
        build=BuildConfig(
            runtime_image=args.runtime_image,
            model_cache_dir=args.model_cache_dir,
            model_cache_max_bytes=args.model_cache_max_bytes,
        ),
        telemetry=telemetry,
        gpus=GpuInventory(api),
        logger=logger,
        metrics_provider=functools.partial(PrometheusProvider, timeout=args.prometheus_timeout),
        prometheus_url=args.prometheus_url,
        api_timeout=args.api_timeout,
        resync_seconds=args.resync_seconds,
        namespaces=tuple(args.namespace),
        activator_service=args.activator_service,
    )


def new_elector(
    args: argparse.Namespace, api_client: ApiClient, telemetry: Telemetry, logger: logging.Logger
) -> LeaderElector | None:
    """The Lease candidate (None without --leader-elect); it also names the client's
    requests: each replica's User-Agent carries its identity, so the API server's audit log
    tells which one wrote what (the fencing tests read it), as client-go's agents do."""
    if not args.leader_elect:
        telemetry.leader.set(1)
        api_client.user_agent = f"{USER_AGENT}/{__version__}"
        return None
    elector = LeaderElector(
        KubernetesLeases(
            api_client,
            timeout=args.timing.renew_deadline / 2,
            on_request=telemetry.count_request,
        ),
        lease=(args.leader_election_namespace or default_namespace(), LEASE_NAME),
        identity=new_identity(),
        logger=logger,
        timing=args.timing,
    )
    api_client.user_agent = f"{USER_AGENT}/{__version__} ({elector.identity})"
    telemetry.leader.set_function(lambda: float(elector.leading))
    return elector


async def run(args: argparse.Namespace, logger: logging.Logger) -> int:
    """Run until SIGTERM (0) or until the Lease is lost (1: restart clean)."""
    telemetry = Telemetry()
    api_client = load_api_client(args.kubeconfig)
    elector = new_elector(args, api_client, telemetry, logger)
    ctx = build_context(
        args, api_client, telemetry, logger, (lambda: elector.leading) if elector else None
    )
    reconciler = Reconciler(ctx, workers=args.workers, budget_seconds=args.reconcile_budget_seconds)
    loops: list[asyncio.Task[None]] = []
    contact = Contact()
    telemetry.watch_silence.source = contact.silence
    start_http_server(args.metrics_port, addr=args.bind_address, registry=telemetry.registry)
    health = HealthServer(
        args.bind_address,
        args.health_port,
        lambda: health_check(
            reconciler,
            elector,
            loops,
            args.reconcile_stall_seconds,
            contact,
            args.watch_inactivity_timeout,
        ),
    )
    health.start()
    stop = asyncio.Event()  # SIGINT/SIGTERM: ours until kopf runs, then kopf's cleanup handler
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    logger.info(
        "Starting modeldeploy operator",
        extra={
            "version": __version__,
            "namespaces": args.namespace or "all",
            "identity": elector.identity if elector else None,
        },
    )
    lost = False
    stops: list[threading.Event] = []
    try:
        if elector is not None and not await elector.acquire(stop):
            return 0  # stopped while standing by: nothing was written, nothing to release
        stops.append(await watch_children(reconciler, ctx, api_client, args, stop, contact))
        reconciler.start()
        loops.append(asyncio.create_task(resync(reconciler, ctx, stop), name="resync"))
        watches = asyncio.create_task(
            handlers.serve(
                reconciler,
                ctx,
                namespaces=tuple(args.namespace),
                connection=faults.watch_connection(connection_of(api_client), args.watch_server),
                stop=stop,
                timing=watch_timing(args),
            )
        )
        keeper = asyncio.create_task(elector.keep(stop)) if elector else None
        await asyncio.wait({watches, *([keeper] if keeper else [])}, return_when="FIRST_COMPLETED")
        lost = keeper is not None and keeper.done() and keeper.result()
        if lost:
            exit_after(10.0, 1)
        stop.set()  # kopf returns on its own SIGINT/SIGTERM handling or on this flag
        await watches
        for task in (*loops, *([keeper] if keeper else [])):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        stop.set()
        for event in stops:
            event.set()
        # Each worker finishes the object it holds; one blocked in a request is left behind
        # (a daemon thread), and once the Lease is released its writes are refused anyway.
        if not await asyncio.to_thread(reconciler.stop, WORKER_STOP_SECONDS):
            logger.warning("Stopped without waiting for a reconcile still running")
        if elector is not None and not lost:
            await asyncio.to_thread(elector.release)
        health.stop()
    logger.info("Stopped modeldeploy operator", extra={"lostLease": lost})
    return 1 if lost else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logger = logs.configure(args.log_format, args.log_level)
    # `kill -USR1 <pid>` prints every thread's stack to stderr (Go's SIGQUIT): what a stuck
    # operator is waiting for, without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # No ``_created`` series (each a series of its own in the text format, for a timestamp).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    return asyncio.run(run(args, logger))


if __name__ == "__main__":
    sys.exit(main())
