"""The activator: durations, finding a request's ModelDeployment, the per-MD wake, and the
HTTP and gRPC fronts holding requests, waking once and forwarding to fake pods on 127.0.0.1;
kube.py's list, watch and scale patch against a fake API server."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from modeldeploy_runtime.activator import (
    Activator,
    ActivatorGrpc,
    ActivatorHttp,
    ActivatorMetrics,
    ActivatorOptions,
    Directory,
    Target,
    Wake,
    activate,
    format_duration,
    parse_duration,
)
from modeldeploy_runtime.http1 import ProtocolError
from modeldeploy_runtime.kube import Gone, KubeApi, KubeError, Watcher
from modeldeploy_runtime.settings import RuntimeSettings

pytestmark = pytest.mark.timeout(60)

INFER = "/inference.GRPCInferenceService/ModelInfer"
PREFIX = "/apis/serving.modeldeploy.io/v1alpha1"


def md(
    name: str = "iris",
    namespace: str = "ns",
    *,
    model: str = "m",
    replicas: int = 0,
    addresses: tuple[str, ...] = (),
    service_ip: str = "",
    enabled: bool = True,
    wake: str | None = None,
    max_held: int | None = None,
    min_replicas: int = 1,
) -> dict[str, Any]:
    zero: dict[str, Any] = {"enabled": enabled}
    if wake is not None:
        zero["wakeTimeout"] = wake
    if max_held is not None:
        zero["maxHeldRequests"] = max_held
    activation: dict[str, Any] = {"addresses": list(addresses)}
    if service_ip:
        activation["serviceIP"] = service_ip
    return {
        "metadata": {"namespace": namespace, "name": name},
        "spec": {
            "replicas": replicas,
            "model": {"name": model},
            "autoscaling": {"minReplicas": min_replicas, "scaleToZero": zero},
        },
        "status": {"activation": activation},
    }


def changes(*mds: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any] | None]:
    return {(m["metadata"]["namespace"], m["metadata"]["name"]): m for m in mds}


def sample(metrics: ActivatorMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def until(what: str, check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- pure parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600), ("90s", 90), ("1h30m", 5400), ("500ms", 0.5), ("1.5h", 5400), ("0", 0)],
)
def test_go_durations_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "m", "10 m", "-1s", "1d", "1m1", "s10"])
def test_anything_else_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_durations_print_as_go_prints_them() -> None:
    assert [format_duration(s) for s in (600, 5400, 90, 0.2, 0)] == [
        "10m0s",
        "1h30m0s",
        "1m30s",
        "200ms",
        "0s",
    ]


def test_an_md_without_scale_to_zero_settings_gets_the_defaults() -> None:
    target = Target.from_md({"metadata": {"namespace": "ns", "name": "a"}, "spec": {}})
    assert (target.enabled, target.wake_timeout, target.max_held, target.min_replicas) == (
        False,
        600.0,
        100,
        1,
    )
    broken = md(wake="soon", max_held=-3, min_replicas=0)
    target = Target.from_md(broken)
    assert (target.wake_timeout, target.max_held, target.min_replicas) == (600.0, 100, 1)
    assert Target.from_md(md(min_replicas=3, wake="90s")).min_replicas == 3


def directory() -> Directory:
    found = Directory()
    found.apply(
        changes(
            md("iris", "a", model="shared", service_ip="10.0.0.7"),
            md("iris", "b", model="shared"),
            md("solo", "a", model="only"),
            md("plain", "a", enabled=False),
        )
    )
    return found


def test_the_host_names_the_md_by_service_ip_fqdn_short_name_or_bare_name() -> None:
    found = directory()
    assert found.by_host("10.0.0.7:8080").key == ("a", "iris")
    assert found.by_host("iris.a.svc.cluster.local").key == ("a", "iris")
    assert found.by_host("iris.b").key == ("b", "iris")
    assert found.by_host("IRIS.b:8080").key == ("b", "iris")
    assert found.by_host("solo").key == ("a", "solo")
    assert found.by_host("solo:80").key == ("a", "solo")


def test_a_bare_name_in_several_namespaces_is_a_400_naming_the_way_out() -> None:
    with pytest.raises(ProtocolError) as caught:
        directory().by_host("iris")
    assert (caught.value.status, caught.value.reason) == (400, "ambiguous")
    assert "<name>.<namespace>" in caught.value.message
    assert "iris.a" in caught.value.message


@pytest.mark.parametrize("host", ["nope", "iris.c", "plain.a", "10.0.0.8", "", "[::1]:80"])
def test_no_scale_to_zero_md_is_a_404(host: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        directory().by_host(host)
    assert (caught.value.status, caught.value.reason) == (404, "unknown")


def test_grpc_finds_the_md_by_metadata_or_by_a_model_only_one_md_serves() -> None:
    found = directory()
    assert found.by_metadata("iris.b").key == ("b", "iris")
    assert found.by_model("only").key == ("a", "solo")
    with pytest.raises(ProtocolError, match=r"x-modeldeploy-target: <name>\.<namespace>") as caught:
        found.by_model("shared")
    assert caught.value.status == 400
    with pytest.raises(ProtocolError) as caught:
        found.by_model("absent")
    assert caught.value.status == 404


def test_a_wake_is_shared_by_its_requests_and_a_new_one_starts_after_it_ends() -> None:
    target = Target.from_md(md(wake="10s", max_held=2))
    wake = Wake()
    assert wake.join(100.0, target) == (1, 110.0)
    assert wake.join(105.0, target) == (1, 110.0)  # the same wake: the same deadline
    with pytest.raises(ProtocolError) as caught:
        wake.join(106.0, target)
    assert (caught.value.status, caught.value.reason) == (503, "queue_full")
    assert caught.value.headers == ("retry-after: 1",)
    wake.leave()
    wake.leave()
    assert wake.join(111.0, target) == (2, 121.0)  # the first wake timed out: a new one
    assert wake.answered(2, 115.0) == 4.0
    assert wake.answered(2, 116.0) is None  # only the first answer measures the wake
    wake.ready()
    wake.leave()
    assert wake.join(117.0, target) == (3, 127.0)  # ready meanwhile: back at zero is anew


# -- the fronts, with fake pods ------------------------------------------------------------------


class FakePatch:
    """The scale patch: counts calls; answers ``results`` in turn (an exception is raised)."""

    def __init__(self, *results: bool | Exception, gate: asyncio.Event | None = None) -> None:
        self.results = list(results) or [True]
        self.calls: list[tuple[str, str, int]] = []
        self.gate = gate  # when given, a patch answers only once it is set

    async def __call__(self, target: Target) -> bool:
        self.calls.append((target.namespace, target.name, target.min_replicas))
        if self.gate is not None:
            await self.gate.wait()
        result = self.results[min(len(self.calls), len(self.results)) - 1]
        if isinstance(result, Exception):
            raise result
        return result


async def fake_pod() -> tuple[asyncio.Server, int, list[bytes]]:
    """A pod's sidecar over HTTP: every request answered 200 with a small JSON body; the
    heads it got are kept."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                heads.append(head)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                body = b'{"outputs": []}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], heads


async def call(
    port: int, host: str, path: str = "/v2/models/m/infer", body: bytes = b"{}"
) -> tuple[int, dict[str, str], bytes]:
    """One request on a connection of its own: status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    method = "POST" if path.endswith("infer") else "GET"
    head = f"{method} {path} HTTP/1.1\r\nhost: {host}\r\nx-api-key: secret\r\nconnection: close\r\n"
    if method == "POST":
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + (body if method == "POST" else b""))
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    head_bytes, _, rest = answer.partition(b"\r\n\r\n")
    lines = head_bytes.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, rest


class Rig:
    """An activator with its HTTP and gRPC fronts on 127.0.0.1, a fake patch, and the pods'
    ports given (the fake pods all listen on 127.0.0.1)."""

    def __init__(self, patch: FakePatch, pod_http: int = 1, pod_grpc: int = 1) -> None:
        self.patch = patch
        self.metrics = ActivatorMetrics()
        self.directory = Directory()
        self.sleeps: list[float] = []
        self.activator = Activator(self.directory, patch, self.metrics, sleep=self._sleep)
        settings = RuntimeSettings.model_validate({"upstream_timeout_seconds": 5})
        self.http = ActivatorHttp(settings, self.activator, pod_port=pod_http)
        self.grpc = ActivatorGrpc(settings, self.activator, pod_port=pod_grpc)

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(0)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[tuple[int, int]]:
        server = await asyncio.start_server(self.http.handle, "127.0.0.1", 0)
        grpc_server = grpc.aio.server()
        grpc_server.add_generic_rpc_handlers([self.grpc])
        grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        try:
            yield server.sockets[0].getsockname()[1], grpc_port
        finally:
            self.activator.close()  # as activate() shuts down: held requests answered first
            server.close()
            await self.activator.settled(2.0)
            self.http.close_all()
            await grpc_server.stop(0)
            await self.grpc.close()

    def held(self, key: tuple[str, str] = ("ns", "iris")) -> float:
        return sample(
            self.metrics,
            "modeldeploy_activator_held_requests",
            namespace=key[0],
            modeldeployment=key[1],
        )


def test_twenty_held_requests_wake_the_md_once_and_are_all_forwarded() -> None:
    async def go() -> None:
        pod, pod_port, heads = await fake_pod()
        patched = asyncio.Event()  # the patch stays in flight while all 20 arrive
        rig = Rig(FakePatch(True, gate=patched), pod_http=pod_port)
        rig.activator.update(changes(md(min_replicas=2)))
        async with rig.running() as (port, _):
            calls = [
                asyncio.create_task(call(port, "iris.ns.svc.cluster.local")) for _ in range(20)
            ]
            await until("20 held requests", lambda: rig.held() == 20)
            patched.set()
            await asyncio.sleep(0.05)
            assert rig.patch.calls == [("ns", "iris", 2)]  # one wake for all, to minReplicas
            rig.activator.update(changes(md(replicas=2)))  # the watch: scaled, no pod ready
            await asyncio.sleep(0.05)
            assert rig.held() == 20
            rig.activator.update(changes(md(replicas=2, addresses=("127.0.0.1",))))
            async with asyncio.timeout(10):
                answers = await asyncio.gather(*calls)
        pod.close()
        assert [status for status, _, _ in answers] == [200] * 20
        assert all(body == b'{"outputs": []}' for _, _, body in answers)
        assert len(heads) == 20
        assert all(b"x-api-key: secret" in head for head in heads)  # credentials untouched
        assert len(rig.patch.calls) == 1
        labels = {"namespace": "ns", "modeldeployment": "iris"}
        assert sample(rig.metrics, "modeldeploy_activator_wakeups_total", **labels) == 1
        assert sample(rig.metrics, "modeldeploy_activator_wake_seconds_count", **labels) == 1
        assert rig.held() == 0
        assert (
            sample(
                rig.metrics,
                "modeldeploy_runtime_requests_total",
                **labels,
                model="m",
                version="",
                track="activator",
                code="200",
            )
            == 20
        )

    asyncio.run(go())


def test_past_max_held_requests_a_request_gets_503_with_retry_after() -> None:
    async def go() -> None:
        rig = Rig(FakePatch(True))
        rig.activator.update(changes(md(max_held=2)))
        async with rig.running() as (port, _):
            held = [asyncio.create_task(call(port, "iris.ns")) for _ in range(2)]
            await until("2 held requests", lambda: rig.held() == 2)
            status, headers, body = await call(port, "iris.ns")
            assert status == 503
            assert headers["retry-after"] == "1"
            assert "maxHeldRequests" in json.loads(body)["error"]
        # Closing answers the held ones: a clean, retryable 503, never a hang.
        for status, headers, body in await asyncio.gather(*held):
            assert (status, headers["retry-after"]) == (503, "1")
            assert json.loads(body) == {"error": "activator shutting down: retry"}
        labels = {"namespace": "ns", "modeldeployment": "iris"}
        assert (
            sample(
                rig.metrics, "modeldeploy_activator_refused_total", **labels, reason="queue_full"
            )
            == 1
        )
        assert (
            sample(
                rig.metrics, "modeldeploy_activator_refused_total", **labels, reason="shutting_down"
            )
            == 2
        )

    asyncio.run(go())


def test_a_request_held_past_the_wake_timeout_gets_503_with_retry_after() -> None:
    async def go() -> None:
        rig = Rig(FakePatch(True))
        rig.activator.update(changes(md(wake="200ms")))
        async with rig.running() as (port, _):
            started = time.monotonic()
            status, headers, body = await call(port, "iris.ns")
            took = time.monotonic() - started
        assert (status, headers["retry-after"]) == (503, "30")
        assert json.loads(body)["error"] == (
            "ns/iris did not become ready within 200ms of waking:"
            " kubectl describe modeldeployment -n ns iris says why"
        )
        # Held until the timeout, not refused at once (an upper bound is the fake-clock
        # test's: test_a_wake_is_shared_by_its_requests_and_a_new_one_starts_after_it_ends).
        assert took >= 0.2
        assert len(rig.patch.calls) == 1
        assert (
            sample(
                rig.metrics,
                "modeldeploy_runtime_requests_total",
                namespace="ns",
                modeldeployment="iris",
                model="m",
                version="",
                track="activator",
                code="503",
            )
            == 1
        )

    asyncio.run(go())


def test_health_is_answered_without_waking() -> None:
    async def go() -> None:
        rig = Rig(FakePatch(True))
        rig.activator.update(changes(md(wake="200ms")))
        async with rig.running() as (port, _):
            assert (await call(port, "anything", "/v2/health/live"))[::2] == (200, b"{}")
            status, _, body = await call(port, "iris.ns", "/v2/health/ready")
            assert status == 503
            assert json.loads(body) == {
                "error": "ns/iris is scaled to zero: an inference request wakes it"
            }
            status, _, body = await call(port, "nope.ns")
            assert status == 404
            assert "no ModelDeployment ns/nope" in json.loads(body)["error"]
            assert rig.patch.calls == []
            status, _, body = await call(port, "iris.ns", "/v2/models/m/ready")  # this wakes
            assert status == 503
            assert "did not become ready within 200ms" in json.loads(body)["error"]
        assert rig.patch.calls == [("ns", "iris", 1)]

    asyncio.run(go())


def test_a_422_from_the_patch_means_woken_by_someone_else() -> None:
    async def go() -> None:
        rig = Rig(FakePatch(False))
        rig.activator.update(changes(md()))
        target = rig.directory.by_host("iris.ns")
        held = asyncio.create_task(rig.activator.admit(target))
        await until("the patch", lambda: len(rig.patch.calls) == 1)
        await asyncio.sleep(0.05)
        assert len(rig.patch.calls) == 1  # not retried
        rig.activator.update(changes(md(replicas=1, addresses=("10.0.0.1",))))
        admission = await asyncio.wait_for(held, 5)
        assert admission.target.addresses == ("10.0.0.1",)
        labels = {"namespace": "ns", "modeldeployment": "iris"}
        assert sample(rig.metrics, "modeldeploy_activator_wakeups_total", **labels) == 0
        rig.activator.close()

    asyncio.run(go())


def test_a_failed_patch_is_retried_with_backoff_and_counted() -> None:
    async def go() -> None:
        failure = KubeError(500, "etcd is unhappy")
        rig = Rig(FakePatch(failure, failure, True))
        rig.activator.update(changes(md()))
        held = asyncio.create_task(rig.activator.admit(rig.directory.by_host("iris.ns")))
        await until("three patches", lambda: len(rig.patch.calls) == 3)
        labels = {"namespace": "ns", "modeldeployment": "iris"}
        assert rig.sleeps == [0.5, 1.0]
        assert sample(rig.metrics, "modeldeploy_activator_wake_errors_total", **labels) == 2
        assert sample(rig.metrics, "modeldeploy_activator_wakeups_total", **labels) == 1
        rig.activator.close()
        with pytest.raises(ProtocolError, match="shutting down"):
            await asyncio.wait_for(held, 5)

    asyncio.run(go())


def test_an_md_already_scaling_up_is_not_patched() -> None:
    async def go() -> None:
        rig = Rig(FakePatch(True))
        rig.activator.update(changes(md(replicas=1)))
        held = asyncio.create_task(rig.activator.admit(rig.directory.by_host("iris.ns")))
        await until("held", lambda: rig.held() == 1)
        await asyncio.sleep(0.05)
        rig.activator.update(changes(md(replicas=1, addresses=("10.0.0.2",))))
        assert (await asyncio.wait_for(held, 5)).target.addresses == ("10.0.0.2",)
        assert rig.patch.calls == []

    asyncio.run(go())


def test_a_request_held_for_an_md_deleted_meanwhile_is_refused_at_once() -> None:
    async def go() -> None:
        rig = Rig(FakePatch(True))
        rig.activator.update(changes(md()))
        held = asyncio.create_task(rig.activator.admit(rig.directory.by_host("iris.ns")))
        await until("held", lambda: rig.held() == 1)
        rig.activator.update({("ns", "iris"): None})
        with pytest.raises(ProtocolError, match="ns/iris was deleted") as caught:
            await asyncio.wait_for(held, 5)
        assert caught.value.status == 404

    asyncio.run(go())


# -- gRPC ---------------------------------------------------------------------------------------


class EchoPod(grpc.GenericRpcHandler):  # type: ignore[misc] # grpc has no stubs
    """A pod's sidecar over gRPC: answers ``echo:<message>|<x-api-key>``."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            key = dict(context.invocation_metadata() or ()).get("x-api-key", "")
            return b"echo:" + request + b"|" + str(key).encode()

        async def stream(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            async for request in requests:
                yield b"stream:" + request

        if details.method.endswith("ModelStreamInfer"):
            return grpc.stream_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)


def infer_message(model: str) -> bytes:
    """A ModelInferRequest with only model_name (field 1) set."""
    return b"\x0a" + bytes([len(model)]) + model.encode()


def test_a_grpc_model_infer_is_held_then_forwarded_to_the_pod() -> None:
    async def go() -> None:
        pod = grpc.aio.server()
        pod.add_generic_rpc_handlers([EchoPod()])
        pod_port = pod.add_insecure_port("127.0.0.1:0")
        await pod.start()
        rig = Rig(FakePatch(True), pod_grpc=pod_port)
        rig.activator.update(
            changes(
                md(model="m"),
                md("other", "ns2", model="shared"),
                md("again", "ns3", model="shared"),
            )
        )
        async with (
            rig.running() as (_, port),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            infer = channel.unary_unary(INFER)
            message = infer_message("m")

            async def held_call() -> bytes:
                return bytes(await infer(message, metadata=(("x-api-key", "secret"),), timeout=10))

            answer = asyncio.create_task(held_call())
            await until("the held call", lambda: rig.held() == 1)
            assert rig.patch.calls == [("ns", "iris", 1)]
            rig.activator.update(changes(md(replicas=1, addresses=("127.0.0.1",))))
            assert await answer == b"echo:" + message + b"|secret"
            stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
            replies = [r async for r in stream(iter([message, message]), timeout=10)]
            assert replies == [b"stream:" + message] * 2
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await infer(infer_message("shared"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "x-modeldeploy-target" in (caught.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await infer(infer_message("absent"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
            assert await live(b"", timeout=5) == b"\x08\x01"
        await pod.stop(0)
        labels = {"namespace": "ns", "modeldeployment": "iris", "model": "m", "version": ""}
        assert (
            sample(
                rig.metrics,
                "modeldeploy_runtime_requests_total",
                **labels,
                track="activator",
                code="OK",
            )
            == 3  # the unary call and the stream's two messages
        )

    asyncio.run(go())


def test_a_grpc_call_past_the_wake_timeout_is_unavailable_with_retry_after() -> None:
    async def go() -> None:
        rig = Rig(FakePatch(True))
        rig.activator.update(changes(md(wake="200ms")))
        async with (
            rig.running() as (_, port),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            infer = channel.unary_unary(INFER)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await infer(
                    infer_message("other-name"),
                    metadata=(("x-modeldeploy-target", "iris.ns"),),
                    timeout=10,
                )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "within 200ms of waking" in (caught.value.details() or "")
        assert ("retry-after", "30") in tuple(caught.value.trailing_metadata() or ())

    asyncio.run(go())


# -- kube.py against a fake API server ----------------------------------------------------------


class FakeApi:
    """An API server on 127.0.0.1 for ModelDeployments: a list, scripted watches (the first
    streams four events, the second answers 410, later ones end at once), and the scale
    subresource answering ``patch_answers`` in turn."""

    def __init__(self) -> None:
        self.items = [md("iris", "a")]
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.watches = 0
        self.patch_answers = [200, 422, 500]
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, dict(self.headers), b""))
                if "watch=1" in self.path:
                    fake.watches += 1
                    if fake.watches == 1:
                        self._stream(fake.first_watch())
                    elif fake.watches == 2:
                        self._json(410, {"kind": "Status", "code": 410, "message": "too old"})
                    else:
                        time.sleep(0.1)
                        self._stream([])
                    return
                self._json(200, {"metadata": {"resourceVersion": "10"}, "items": fake.items})

            def do_PATCH(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                fake.requests.append(("PATCH", self.path, dict(self.headers), body))
                status = fake.patch_answers.pop(0)
                self._json(status, {"kind": "Scale", "message": f"answered {status}"})

            def _json(self, status: int, obj: Any) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _stream(self, events: list[dict[str, Any]]) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for event in events:
                    line = json.dumps(event).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def first_watch(self) -> list[dict[str, Any]]:
        other = md("other", "b")
        other["metadata"]["resourceVersion"] = "11"
        woken = md("iris", "a", replicas=1, addresses=("10.1.1.1",))
        woken["metadata"]["resourceVersion"] = "13"
        return [
            {"type": "ADDED", "object": other},
            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}},
            {"type": "MODIFIED", "object": woken},
            {
                "type": "DELETED",
                "object": {**other, "metadata": {**other["metadata"], "resourceVersion": "14"}},
            },
        ]

    def __enter__(self) -> FakeApi:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_api() -> Iterator[FakeApi]:
    with FakeApi() as api:
        yield api


def test_the_scale_patch_is_a_conditional_json_patch_and_422_means_already_woken(
    fake_api: FakeApi, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    api = KubeApi(fake_api.url, token_file=token)
    assert api.patch_scale("a", "iris", 2) is True
    token.write_text("rotated")  # bound tokens rotate: read on every request
    assert api.patch_scale("a", "iris", 2) is False
    with pytest.raises(KubeError) as caught:
        api.patch_scale("a", "iris", 2)
    assert caught.value.status == 500
    assert "answered 500" in caught.value.message
    (_, path, headers, body), second = fake_api.requests[0], fake_api.requests[1]
    assert path == f"{PREFIX}/namespaces/a/modeldeployments/iris/scale"
    assert headers["Content-Type"] == "application/json-patch+json"
    assert json.loads(body) == [
        {"op": "test", "path": "/spec", "value": {}},
        {"op": "add", "path": "/spec/replicas", "value": 2},
    ]
    assert headers["Authorization"] == "Bearer first"
    assert second[2]["Authorization"] == "Bearer rotated"


def test_list_and_watch_paths_and_a_watch_that_expired(fake_api: FakeApi) -> None:
    api = KubeApi(fake_api.url, token_file=None)
    items, version = api.list("a")
    assert (len(items), version) == (1, "10")
    assert fake_api.requests[-1][1] == f"{PREFIX}/namespaces/a/modeldeployments"
    assert "Authorization" not in fake_api.requests[-1][2]
    events = list(api.watch("10"))
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK", "MODIFIED", "DELETED"]
    assert fake_api.requests[-1][1] == (
        f"{PREFIX}/modeldeployments?watch=1&resourceVersion=10"
        "&allowWatchBookmarks=true&timeoutSeconds=300"
    )
    with pytest.raises(Gone):
        list(api.watch("14"))


def test_the_watcher_delivers_changes_and_lists_again_after_410(fake_api: FakeApi) -> None:
    batches: list[dict[tuple[str, str], Any]] = []
    watcher = Watcher(KubeApi(fake_api.url), batches.append, timeout_seconds=5)
    watcher.start()
    deadline = time.monotonic() + 10
    while watcher.lists < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    watcher.stop()
    assert watcher.lists >= 2, "no list after the 410"
    first, added, woken, deleted, relisted = batches[:5]
    assert list(first) == [("a", "iris")]
    assert list(added) == [("b", "other")]
    assert woken[("a", "iris")]["status"]["activation"]["addresses"] == ["10.1.1.1"]
    assert deleted == {("b", "other"): None}
    # The list after the 410 differs from the snapshot (iris is back as listed): delivered.
    assert list(relisted) == [("a", "iris")]
    watch_paths = [path for method, path, _, _ in fake_api.requests if "watch=1" in path]
    assert "resourceVersion=10&" in watch_paths[0]
    assert "resourceVersion=14&" in watch_paths[1]  # the last version seen
    assert "resourceVersion=10&" in watch_paths[2]  # from the new list


def test_in_cluster_defaults_come_from_the_environment() -> None:
    api = KubeApi.configured(
        environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    )
    assert api.url == "https://10.96.0.1:443"
    with pytest.raises(KubeError, match="--api-url"):
        KubeApi.configured(environ={})


# -- the whole command --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_activate_serves_from_the_watch_and_refuses_held_requests_when_stopped(
    fake_api: FakeApi,
) -> None:
    fake_api.items = [md("iris", "a")]
    fake_api.watches = 2  # every watch ends at once: the list is what the activator knows
    fake_api.patch_answers = [200] * 10
    options = ActivatorOptions(
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        api_url=fake_api.url,
        grace_seconds=0.3,
        bind_address="127.0.0.1",
    )

    async def healthz() -> int:
        with contextlib.suppress(OSError):
            return (await call(options.metrics_port, "x", "/healthz"))[0]
        return 0

    async def go() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(activate(options, stop=stop))
        try:
            deadline = time.monotonic() + 10
            while await healthz() != 200:
                assert time.monotonic() < deadline, "never listed"
                await asyncio.sleep(0.05)
            held = asyncio.create_task(call(options.http_port, "iris.a"))
            await until("the wake", lambda: any(m == "PATCH" for m, _, _, _ in fake_api.requests))
            _, _, exposition = await call(options.metrics_port, "x", "/metrics")
            held_series = (
                b'modeldeploy_activator_held_requests{modeldeployment="iris",namespace="a"}'
            )
            assert held_series + b" 1.0" in exposition
            stop.set()
            assert await healthz() == 503  # draining: out of the Service's endpoints
            status, headers, body = await asyncio.wait_for(held, 10)
            assert (status, headers["retry-after"]) == (503, "1")
            assert json.loads(body) == {"error": "activator shutting down: retry"}
        finally:
            stop.set()  # never a grpc server left to the garbage collector
            await asyncio.wait_for(running, 15)

    asyncio.run(go())
