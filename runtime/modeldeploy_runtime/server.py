"""`modeldeploy-runtime serve`: the proxy listener and the metrics/health listener."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import signal

import grpc
import grpc.aio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modeldeploy_runtime.access import (
    AccessControl,
    ApiKeys,
    ClientLabels,
    QueryBudget,
    RateLimiter,
    parse_rate,
    parse_window,
)
from modeldeploy_runtime.coarsen import Coarsener, parse_rules
from modeldeploy_runtime.drift import DriftWindow, Profile
from modeldeploy_runtime.drift_monitor import DriftMonitor
from modeldeploy_runtime.grpc_proxy import GrpcMirrorConnection, GrpcProxy
from modeldeploy_runtime.http1 import ByteBudget, plain, serve_plain
from modeldeploy_runtime.metrics import BudgetCollector, RuntimeMetrics
from modeldeploy_runtime.proxy import HttpProxy, MirrorConnection, Upstream, UpstreamError
from modeldeploy_runtime.settings import RuntimeSettings
from modeldeploy_runtime.shadow import Mirror, ShadowFile, ShadowMetrics
from modeldeploy_runtime.triton_stats import StatsPoller

LOG = logging.getLogger("modeldeploy.runtime")


class AdminServer:
    """``/metrics``, ``/healthz`` (the sidecar is alive), ``/readyz`` (Triton is ready and
    the model is loaded), and ``/triton/live`` and ``/triton/ready``: Triton's own health for
    its container's probes, since Triton listens on 127.0.0.1 only."""

    def __init__(self, settings: RuntimeSettings, metrics: RuntimeMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.budget = ByteBudget(1 << 20)

    async def ready(self, paths: list[bytes]) -> tuple[bool, str]:
        upstream = Upstream(self.settings)
        try:
            for path in paths:
                status, _ = await upstream.get(path)
                if status != 200:
                    return False, f"{path.decode()} answered {status}"
        except UpstreamError as error:
            return False, error.message
        finally:
            upstream.close()
        return True, "ok"

    def model_paths(self) -> list[bytes]:
        paths = [b"/v2/health/ready"]
        if self.settings.model:
            version = (
                f"/versions/{self.settings.model_version}" if self.settings.model_version else ""
            )
            paths.append(f"/v2/models/{self.settings.model}{version}/ready".encode())
        return paths

    async def answer(self, path: str) -> bytes:
        if path == "/metrics":
            return plain(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return plain(200, b"ok")
        checks: dict[str, list[bytes]] = {
            "/readyz": self.model_paths(),
            "/triton/ready": [b"/v2/health/ready"],
            "/triton/live": [b"/v2/health/live"],
        }
        if path in checks:
            ok, why = await self.ready(checks[path])
            return plain(200 if ok else 503, why.encode())
        return plain(404, b"not found")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_plain(
            reader,
            writer,
            self.answer,
            self.budget,
            header_timeout=self.settings.header_timeout_seconds,
            body_timeout=self.settings.client_timeout_seconds,
            idle_timeout=self.settings.idle_timeout_seconds,
        )


def raise_open_files_limit() -> None:
    """Idle clients hold descriptors: use the hard limit, as Go programs do by default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def access_control(settings: RuntimeSettings) -> AccessControl | None:
    """Keys, rate limit and query budget, or None when none is configured."""
    if not (settings.api_keys_dir or settings.rate_limit_per_client or settings.query_budget):
        return None
    keys = ApiKeys(settings.api_keys_dir) if settings.api_keys_dir is not None else None
    budget = None
    if settings.query_budget:
        count, _, window = settings.query_budget.partition("/")
        budget = QueryBudget(int(count), parse_window(window), exhausted_file=settings.budget_file)
    return AccessControl(
        keys=keys,
        limiter=RateLimiter(parse_rate(settings.rate_limit_per_client))
        if settings.rate_limit_per_client
        else None,
        salt=settings.client_salt.encode(),
        # Only valid keys earn labels, so their number is the Secret's; addresses are not.
        clients=ClientLabels(limit=1000 if keys is not None else 100),
        budget=budget,
    )


def reference_profile(settings: RuntimeSettings) -> Profile | None:
    """The drift reference: the mounted profile, else the one the model archive carries."""
    if settings.reference_profile is not None:
        return Profile.load(settings.reference_profile)
    manifest = settings.archive_manifest
    if manifest is None or not manifest.is_file():
        return None
    carried = json.loads(manifest.read_text()).get("referenceProfile")
    if not carried:
        LOG.info("the model archive carries no drift profile: drift is not measured")
        return None
    return Profile.from_json(carried)


async def serve(settings: RuntimeSettings, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``)."""
    raise_open_files_limit()
    metrics = RuntimeMetrics(settings.track, settings.model, settings.model_version)
    monitor = None
    profile = reference_profile(settings)
    if profile is not None:
        window = DriftWindow(profile, settings.drift_window)
        monitor = DriftMonitor(
            window,
            metrics.registry,
            settings.drift_queue_size,
            settings.drift_top_k,
            settings.track,
        )
    access = access_control(settings)
    if access is not None and access.budget is not None:
        metrics.registry.register(BudgetCollector(access.budget.used, settings.track))
    coarsener = Coarsener(parse_rules(settings.coarsen_outputs))
    mirror = None
    if settings.shadow_file is not None and settings.track == "stable":  # a canary never copies
        mirror = Mirror(
            ShadowFile(settings.shadow_file),
            ShadowMetrics(metrics.registry),
            lambda address, grpc: (
                GrpcMirrorConnection(settings, address)
                if grpc
                else MirrorConnection(settings, address)
            ),
            queue_size=settings.shadow_queue_size,
        )
    proxy = HttpProxy(
        settings,
        metrics,
        sampler=monitor.submit if monitor else None,
        access=access,
        coarsener=coarsener,
        mirror=mirror,
    )
    admin = AdminServer(settings, metrics)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    servers = [
        await asyncio.start_server(proxy.handle, settings.bind_address, settings.http_port),
        await asyncio.start_server(admin.handle, settings.bind_address, settings.metrics_port),
    ]
    # Triton's answers may be large; what clients send is bounded like an HTTP body, and
    # gRPC refuses a longer message from its length prefix, before reading it.
    channel = grpc.aio.insecure_channel(
        settings.upstream_grpc,
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )
    grpc_server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
        ]
    )
    grpc_server.add_generic_rpc_handlers(
        [
            GrpcProxy(
                settings,
                metrics,
                channel,
                sampler=proxy.sampler,
                access=access,
                coarsener=coarsener,
                mirror=mirror,
            )
        ]
    )
    grpc_server.add_insecure_port(f"{settings.bind_address}:{settings.grpc_port}")
    await grpc_server.start()
    tasks = []
    if mirror is not None:
        tasks.append(asyncio.create_task(mirror.run(stop)))
    if settings.model:
        poller = StatsPoller(settings, metrics.registry, settings.stats_interval_seconds)
        tasks.append(asyncio.create_task(poller.run(stop)))
    LOG.info(
        "Serving: HTTP on :%d -> %s, gRPC on :%d -> %s, metrics on :%d",
        settings.http_port,
        settings.upstream_http,
        settings.grpc_port,
        settings.upstream_grpc,
        settings.metrics_port,
    )
    try:
        await stop.wait()
    finally:
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()
        await grpc_server.stop(grace=1)
        for task in tasks:
            await task
        await channel.close()
        if monitor is not None:
            monitor.close()
