"""`modeldeploy-runtime serve`: the proxy listener and the metrics/health listener."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
import grpc.aio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modeldeploy_runtime.access import ApiKeys, RateLimiter, parse_rate
from modeldeploy_runtime.drift import DriftWindow, Profile
from modeldeploy_runtime.drift_monitor import DriftMonitor
from modeldeploy_runtime.grpc_proxy import GrpcProxy
from modeldeploy_runtime.http1 import Message, ProtocolError, read_head
from modeldeploy_runtime.metrics import RuntimeMetrics
from modeldeploy_runtime.proxy import AccessControl, HttpProxy, Upstream, UpstreamError
from modeldeploy_runtime.settings import RuntimeSettings
from modeldeploy_runtime.triton_stats import StatsPoller

LOG = logging.getLogger("modeldeploy.runtime")


def plain(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}.get(status, "Error")
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


class AdminServer:
    """``/metrics``, ``/healthz`` (the sidecar is alive) and ``/readyz`` (Triton is ready and
    the model is loaded)."""

    def __init__(self, settings: RuntimeSettings, metrics: RuntimeMetrics) -> None:
        self.settings = settings
        self.metrics = metrics

    async def ready(self) -> tuple[bool, str]:
        paths = [b"/v2/health/ready"]
        if self.settings.model:
            version = (
                f"/versions/{self.settings.model_version}" if self.settings.model_version else ""
            )
            paths.append(f"/v2/models/{self.settings.model}{version}/ready".encode())
        upstream = Upstream(self.settings)
        try:
            for path in paths:
                response = await upstream.exchange(
                    Message(b"GET " + path + b" HTTP/1.1", [(b"host", b"triton")])
                )
                status = response.start.split(b" ", 2)[1]
                if status != b"200":
                    return False, f"{path.decode()} answered {status.decode()}"
        except UpstreamError as error:
            return False, error.message
        finally:
            upstream.close()
        return True, "ok"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (head := await read_head(reader)) is not None:
                path = head[0].split(b" ")[1] if head[0].count(b" ") == 2 else b""
                if path == b"/metrics":
                    writer.write(
                        plain(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
                    )
                elif path == b"/healthz":
                    writer.write(plain(200, b"ok"))
                elif path == b"/readyz":
                    ok, why = await self.ready()
                    writer.write(plain(200 if ok else 503, why.encode()))
                else:
                    writer.write(plain(404, b"not found"))
                await writer.drain()
        except (ProtocolError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def serve(settings: RuntimeSettings, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``)."""
    metrics = RuntimeMetrics(settings.track, settings.model, settings.model_version)
    monitor = None
    if settings.reference_profile is not None:
        window = DriftWindow(Profile.load(settings.reference_profile), settings.drift_window)
        monitor = DriftMonitor(
            window,
            metrics.registry,
            settings.drift_queue_size,
            settings.drift_top_k,
            settings.track,
        )
    access = None
    if settings.api_keys_dir is not None or settings.rate_limit_per_client:
        access = AccessControl(
            keys=ApiKeys(settings.api_keys_dir) if settings.api_keys_dir is not None else None,
            limiter=RateLimiter(parse_rate(settings.rate_limit_per_client))
            if settings.rate_limit_per_client
            else None,
        )
    proxy = HttpProxy(settings, metrics, sampler=monitor.submit if monitor else None, access=access)
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
    unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channel = grpc.aio.insecure_channel(settings.upstream_grpc, options=unlimited)
    grpc_server = grpc.aio.server(options=unlimited)
    grpc_server.add_generic_rpc_handlers(
        [GrpcProxy(settings, metrics, channel, sampler=proxy.sampler, access=access)]
    )
    grpc_server.add_insecure_port(f"{settings.bind_address}:{settings.grpc_port}")
    await grpc_server.start()
    tasks = []
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
