"""The gRPC side of the sidecar: ``inference.GRPCInferenceService`` forwarded to Triton.

Every method is forwarded as raw bytes (no protobuf parsing on the request path). What a
method is comes from the same allowlist as HTTP (routes.py): unknown methods are
UNIMPLEMENTED, administrative ones PERMISSION_DENIED unless allowed. A wrong key is refused
before the message is read (the handler never pulls it); a message longer than
``--max-body-bytes`` is refused by gRPC from its length prefix.

``ModelInfer`` and every message of ``ModelStreamInfer`` are limited and measured, their
model name and version read straight from the first fields of the message. A stream message
over the rate limit gets an in-stream error answer and the stream goes on, as Triton does for
a failed request. Upstream errors keep Triton's status code and message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from modeldeploy_runtime.access import CREDENTIAL_HEADERS, AccessControl
from modeldeploy_runtime.coarsen import Coarsener
from modeldeploy_runtime.http1 import ProtocolError
from modeldeploy_runtime.metrics import RuntimeMetrics
from modeldeploy_runtime.proxy import InferExchange, Sampler
from modeldeploy_runtime.routes import Kind, Route, admin_refused, grpc_route
from modeldeploy_runtime.settings import RuntimeSettings
from modeldeploy_runtime.shadow import (
    MIRROR_HEADER,
    Copy,
    GrpcCall,
    Mirror,
    MirrorFailure,
    copy_token,
    is_copy,
)

STATUS_FOR = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
Metadata = tuple[tuple[str, Any], ...]
MIRROR_KEY = MIRROR_HEADER.decode()
# A copy's gRPC failures, as the mirror counts them (the others are the canary's errors).
MIRROR_RESULTS = {
    grpc.StatusCode.UNAVAILABLE: "unreachable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
    grpc.StatusCode.UNAUTHENTICATED: "refused",
    grpc.StatusCode.PERMISSION_DENIED: "refused",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "refused",
}


class GrpcMirrorConnection:
    """The mirror's channel to one canary pod's gRPC port (shadow.Exchanger)."""

    def __init__(self, settings: RuntimeSettings, address: tuple[str, int]) -> None:
        self._timeout = settings.shadow_timeout_seconds
        self._channel = grpc.aio.insecure_channel(
            f"{address[0]}:{address[1]}", options=[("grpc.max_receive_message_length", -1)]
        )

    async def send(self, call: GrpcCall) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        forward = self._channel.unary_unary(
            call.method, request_serializer=None, response_deserializer=None
        )
        try:
            answer = await forward(call.message, metadata=call.metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            result = MIRROR_RESULTS.get(error.code(), "error")
            raise MirrorFailure(result, f"{error.code().name}: {error.details()}") from error
        return 200, [], bytes(answer)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # no loop left: the channel goes with it
            asyncio.get_running_loop().create_task(self._channel.close())


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def model_and_version(message: bytes) -> tuple[str, str]:
    """``model_name`` (field 1) and ``model_version`` (field 2) of a ModelInferRequest,
    read from the wire without parsing the tensors."""
    found = {1: "", 2: ""}
    offset = 0
    try:
        while offset < len(message) and (not found[1] or not found[2]):
            key, offset = _varint(message, offset)
            field, wire = key >> 3, key & 7
            if wire != 2:
                break
            size, offset = _varint(message, offset)
            if field in found:
                found[field] = message[offset : offset + size].decode(errors="replace")
            elif field > 2:
                break
            offset += size
    except IndexError:
        pass
    return found[1], found[2]


def stream_error(message: str) -> bytes:
    """A ModelStreamInferResponse carrying only ``error_message`` (field 1)."""
    text = message.encode()
    return b"\x0a" + _encode_varint(len(text)) + text


def stream_has_error(response: bytes) -> bool:
    return response[:1] == b"\x0a" and len(response) > 1 and response[1] != 0


async def abort(context: grpc.aio.ServicerContext, refused: ProtocolError) -> None:
    """End a call the door refused: its gRPC status, message and headers (Retry-After)."""
    context.set_trailing_metadata(tuple(tuple(h.split(": ", 1)) for h in refused.headers))
    await context.abort(STATUS_FOR.get(refused.status, grpc.StatusCode.INTERNAL), refused.message)


def _headers(metadata: Metadata | None) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v if isinstance(v, bytes) else str(v).encode()) for k, v in metadata or ()]


class GrpcProxy(grpc.GenericRpcHandler):  # type: ignore[misc] # grpc has no stubs
    def __init__(  # noqa: PLR0913 - settings, metrics, Triton; the rest optional, by keyword
        self,
        settings: RuntimeSettings,
        metrics: RuntimeMetrics,
        channel: grpc.aio.Channel,
        *,
        sampler: Sampler | None = None,
        access: AccessControl | None = None,
        rng: Callable[[], float] = random.random,
        coarsener: Coarsener | None = None,
        mirror: Mirror | None = None,
    ) -> None:
        self.settings = settings
        self.coarsener = coarsener
        self.mirror = mirror
        self.copy_token = copy_token(settings.client_salt)
        self.metrics = metrics
        self.channel = channel
        self.sampler = sampler
        self.access = access
        self.rng = rng

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        route = grpc_route(method)
        if route is None:
            return None
        client = ""
        headers = _headers(handler_call_details.invocation_metadata)
        presented = next((v for k, v in headers if k == MIRROR_HEADER), None)
        copy = route.action == "ModelInfer" and is_copy(presented, self.copy_token)
        try:
            if route.kind is Kind.ADMIN and not self.settings.allow_admin_apis:
                raise admin_refused(route.action)
            if self.access is not None and route.kind is not Kind.HEALTH:
                # Decided from the metadata alone: a refused call's message is never read.
                client = self.access.identify(headers, "", self.metrics)
        except ProtocolError as refused:
            self.metrics.rejected.labels(refused.reason).inc()
            return grpc.stream_unary_rpc_method_handler(self._refuse(refused))
        if route.action == "ModelStreamInfer":
            return grpc.stream_stream_rpc_method_handler(self._stream(method, route, client))
        return grpc.unary_unary_rpc_method_handler(
            self._unary(method, route, client, copy=copy, copied=presented is not None)
        )

    def _refuse(self, refused: ProtocolError) -> Callable[..., Any]:
        async def handle(_: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            await abort(context, refused)
            raise AssertionError("abort raises")

        return handle

    def _client(self, client: str, context: grpc.aio.ServicerContext) -> str:
        """The key's id, decided in ``service``; the peer's address when keys are off."""
        return client or (context.peer() or "unknown").rsplit(":", 1)[0]

    def _metadata(self, context: grpc.aio.ServicerContext) -> list[tuple[str, Any]]:
        return [
            (k, v)
            for k, v in (context.invocation_metadata() or ())
            if k.encode() not in CREDENTIAL_HEADERS
        ]

    def _unary(
        self, method: str, route: Route, client: str, *, copy: bool, copied: bool
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
        """``copy``: a shadow copy proved by its token (keyed, not limited: stable's door took
        its limits); ``copied``: it says it is one (a copy is never copied again)."""
        forward = self.channel.unary_unary(
            method, request_serializer=None, response_deserializer=None
        )
        measured = route.kind is Kind.INFER

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            who = self._client(client, context)
            if self.access is not None and route.kind is not Kind.HEALTH and copy:
                self.metrics.client_requests.labels(
                    self.access.clients.label(who), "shadow_copy"
                ).inc()
            elif self.access is not None and route.kind is not Kind.HEALTH:
                try:
                    self.access.take(who, self.metrics, limited=measured)
                except ProtocolError as refused:
                    self.metrics.rejected.labels(refused.reason).inc()
                    await abort(context, refused)
            started = time.perf_counter()
            if measured:
                self.metrics.in_flight_track.inc()
            code = "OK"
            response = b""
            try:
                response = await forward(
                    request,
                    metadata=self._metadata(context),
                    timeout=self.settings.upstream_timeout_seconds,
                )
                answer = bytes(response)
                if measured and self.coarsener:
                    answer = self.coarsener.grpc(answer)
                if route.action == "ModelInfer" and not copied:
                    self._mirror(method, request, answer, context, started)
                return answer
            except grpc.aio.AioRpcError as error:
                code = error.code().name
                self._count_upstream(error)
                await context.abort(error.code(), error.details() or "")
                raise  # abort raises; this keeps type checkers content
            finally:
                if measured:
                    self.metrics.in_flight_track.dec()
                    self._observe(request, response, code, time.perf_counter() - started)
                    self._sample(who, request, response, code)

        return handle

    def _stream(
        self, method: str, route: Route, client: str
    ) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        forward = self.channel.stream_stream(
            method, request_serializer=None, response_deserializer=None
        )

        async def handle(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            who = self._client(client, context)
            pending: collections.deque[tuple[float, bytes]] = collections.deque()
            # What the client gets, in order: Triton's answers and the sidecar's refusals.
            out: asyncio.Queue[bytes | grpc.aio.AioRpcError | None] = asyncio.Queue(64)

            async def admitted() -> AsyncIterator[bytes]:
                """The client's messages that pass the limit; the others answered in-stream."""
                async for message in requests:
                    if self.access is not None:
                        try:
                            self.access.take(who, self.metrics, limited=True)
                        except ProtocolError as refused:
                            self.metrics.rejected.labels(refused.reason).inc()
                            await out.put(stream_error(refused.message))
                            continue
                    pending.append((time.perf_counter(), message))
                    self.metrics.in_flight_track.inc()
                    yield message

            async def pump() -> None:
                call = forward(admitted(), metadata=self._metadata(context))
                try:
                    async for response in call:
                        if pending:
                            started, message = pending.popleft()
                            self.metrics.in_flight_track.dec()
                            code = "INTERNAL" if stream_has_error(response) else "OK"
                            self._observe(message, response, code, time.perf_counter() - started)
                        answer = bytes(response)
                        if self.coarsener and not stream_has_error(answer):
                            answer = self.coarsener.grpc(answer, stream=True)
                        await out.put(answer)
                except grpc.aio.AioRpcError as error:
                    await out.put(error)
                finally:
                    await out.put(None)

            task = asyncio.create_task(pump())
            try:
                while (item := await out.get()) is not None:
                    if isinstance(item, grpc.aio.AioRpcError):
                        self._count_upstream(item)
                        await context.abort(item.code(), item.details() or "")
                    else:
                        yield item
            finally:
                task.cancel()
                for started, message in pending:
                    self.metrics.in_flight_track.dec()
                    self._observe(message, b"", "CANCELLED", time.perf_counter() - started)

        return handle

    def _mirror(
        self,
        method: str,
        request: bytes,
        answer: bytes,
        context: grpc.aio.ServicerContext,
        started: float,
    ) -> None:
        """A copy for the canary in a shadow step, with the caller's key and the token;
        stable's answer as the client gets it."""
        if self.mirror is None:
            return
        config = self.mirror.sample(self.rng(), grpc=True)
        if config is None:
            return
        metadata = tuple(context.invocation_metadata() or ())
        if self.copy_token is not None:
            metadata += ((MIRROR_KEY, self.copy_token.decode()),)
        call = GrpcCall(method, request, metadata)
        self.mirror.submit(Copy(call, [], answer, time.perf_counter() - started, config))

    def _count_upstream(self, error: grpc.aio.AioRpcError) -> None:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            self.metrics.upstream_errors.labels("connect").inc()
        elif error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.metrics.upstream_errors.labels("timeout").inc()

    def _observe(self, request: bytes, response: bytes, code: str, elapsed: float) -> None:
        model, version = model_and_version(request)
        labels = (*self.metrics.bounded(model, version), self.metrics.track)
        self.metrics.duration.labels(*labels).observe(elapsed)
        self.metrics.requests.labels(*labels, code).inc()
        self.metrics.request_bytes.labels(*labels).observe(len(request))
        self.metrics.response_bytes.labels(*labels).observe(len(response))

    def _sample(self, client: str, request: bytes, response: bytes, code: str) -> None:
        if self.sampler is not None and code == "OK" and self.rng() < self.settings.sample_rate:
            model, _ = model_and_version(request)
            self.sampler(InferExchange(model, "grpc", client, [], request, [], response))
