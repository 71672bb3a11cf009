"""The gRPC side of the sidecar: ``inference.GRPCInferenceService`` forwarded to Triton.

Every method is forwarded as raw bytes (no protobuf parsing on the request path); only
``ModelInfer`` is measured, its model name and version read straight from the first fields
of the message. Upstream errors keep Triton's status code and message.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from modeldeploy_runtime.http1 import ProtocolError
from modeldeploy_runtime.metrics import RuntimeMetrics
from modeldeploy_runtime.proxy import CREDENTIAL_HEADERS, AccessControl, InferExchange, Sampler
from modeldeploy_runtime.settings import RuntimeSettings

SERVICE = "/inference.GRPCInferenceService/"
MODEL_INFER = SERVICE + "ModelInfer"
STREAM_INFER = SERVICE + "ModelStreamInfer"
STATUS_FOR = {401: grpc.StatusCode.UNAUTHENTICATED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED}


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


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


class GrpcProxy(grpc.GenericRpcHandler):  # type: ignore[misc] # grpc has no stubs
    def __init__(
        self,
        settings: RuntimeSettings,
        metrics: RuntimeMetrics,
        channel: grpc.aio.Channel,
        sampler: Sampler | None = None,
        access: AccessControl | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.channel = channel
        self.sampler = sampler
        self.access = access
        self.rng = rng

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if not method.startswith(SERVICE):
            return None
        if method == STREAM_INFER:
            return grpc.stream_stream_rpc_method_handler(self._stream(method))
        return grpc.unary_unary_rpc_method_handler(self._unary(method))

    def _metadata(self, context: grpc.aio.ServicerContext) -> list[tuple[str, Any]]:
        return [
            (k, v)
            for k, v in (context.invocation_metadata() or ())
            if k.encode() not in CREDENTIAL_HEADERS
        ]

    async def _admit(self, context: grpc.aio.ServicerContext, method: str) -> None:
        """The same keys and limits as HTTP; health calls stay open."""
        if self.access is None or method.endswith(("/ServerLive", "/ServerReady")):
            return
        headers = [
            (k.encode(), v if isinstance(v, bytes) else str(v).encode())
            for k, v in (context.invocation_metadata() or ())
        ]
        peer = (context.peer() or "unknown").rsplit(":", 1)[0]
        try:
            self.access.check(headers, peer, self.metrics, limited=method == MODEL_INFER)
        except ProtocolError as refused:
            self.metrics.rejected.labels(refused.reason).inc()
            trailers = tuple(tuple(h.split(": ", 1)) for h in refused.headers)
            context.set_trailing_metadata(trailers)
            await context.abort(STATUS_FOR[refused.status], refused.message)

    def _unary(self, method: str) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
        forward = self.channel.unary_unary(
            method, request_serializer=None, response_deserializer=None
        )

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await self._admit(context, method)
            started = time.perf_counter()
            measured = method == MODEL_INFER
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
                return bytes(response)
            except grpc.aio.AioRpcError as error:
                code = error.code().name
                self._count_upstream(error)
                await context.abort(error.code(), error.details() or "")
                raise  # abort raises; this keeps type checkers content
            finally:
                if measured:
                    self.metrics.in_flight_track.dec()
                    self._observe(request, response, code, time.perf_counter() - started)

        return handle

    def _stream(
        self, method: str
    ) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        forward = self.channel.stream_stream(
            method, request_serializer=None, response_deserializer=None
        )

        async def handle(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            await self._admit(context, method)
            call = forward(requests, metadata=self._metadata(context))
            try:
                async for response in call:
                    yield bytes(response)
            except grpc.aio.AioRpcError as error:
                self._count_upstream(error)
                await context.abort(error.code(), error.details() or "")

        return handle

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
        if self.sampler is not None and code == "OK" and self.rng() < self.settings.sample_rate:
            self.sampler(InferExchange(model, "grpc", [], request, [], response))
