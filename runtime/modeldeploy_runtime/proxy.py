"""The HTTP side of the sidecar: a transparent KServe v2 proxy in front of the local Triton.

Each client connection gets its own keep-alive connection to Triton, so requests on it are
forwarded in order with no pooling or locking. Bodies are forwarded byte for byte (JSON or
Triton's binary tensor extension alike); only inference calls are measured. Anything the
proxy refuses or Triton cannot answer gets a Triton-style ``{"error": ...}`` and a counter.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from modeldeploy_runtime.access import ApiKeys, ClientLabels, RateLimiter, client_id, presented_key
from modeldeploy_runtime.http1 import (
    Message,
    ProtocolError,
    error_response,
    has_no_body,
    read_body,
    read_head,
)
from modeldeploy_runtime.metrics import RuntimeMetrics
from modeldeploy_runtime.settings import RuntimeSettings

CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")
INFER_PATH = re.compile(rb"^/v2/models/([^/?]+)(?:/versions/([^/?]+))?/infer(?:\?.*)?$")
# JSON, Triton's binary extension, and curl's default for -d (Triton reads it as JSON).
ACCEPTED_TYPES = (
    b"application/json",
    b"application/octet-stream",
    b"application/x-www-form-urlencoded",
)


@dataclass(frozen=True)
class InferExchange:
    """One sampled inference call, handed to the drift worker off the request path."""

    model: str
    protocol: str  # "http" or "grpc"
    request_headers: list[tuple[bytes, bytes]]
    request_body: bytes
    response_headers: list[tuple[bytes, bytes]]
    response_body: bytes


Sampler = Callable[[InferExchange], None]


class UpstreamError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class Upstream:
    """One keep-alive connection to Triton, opened lazily and reopened when it breaks."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self._settings = settings
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: Message) -> Message:
        data = request.encode()
        for attempt in (1, 2):
            fresh = self._writer is None
            try:
                reader, writer = await self._connect()
                writer.write(data)
                await writer.drain()
                return await self._read_response(reader, request)
            except (ConnectionError, asyncio.IncompleteReadError) as error:
                self.close()
                # A kept-alive connection Triton closed meanwhile: retry once on a new one.
                if fresh or attempt == 2:
                    message = f"Triton closed the connection: {error}"
                    raise UpstreamError(502, "connection", message) from error
        raise AssertionError("unreachable")

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is not None and self._writer is not None:
            return self._reader, self._writer
        host, port = self._settings.upstream_host_port()
        try:
            async with asyncio.timeout(self._settings.connect_timeout_seconds):
                self._reader, self._writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as error:
            message = f"cannot reach Triton at {host}:{port}: {error}"
            raise UpstreamError(502, "connect", message) from error
        return self._reader, self._writer

    async def _read_response(self, reader: asyncio.StreamReader, request: Message) -> Message:
        try:
            async with asyncio.timeout(self._settings.upstream_timeout_seconds):
                head = await read_head(reader)
                if head is None:
                    raise asyncio.IncompleteReadError(b"", None)
                response = Message(head[0], head[1])
                if not has_no_body(request.start, response.start):
                    await read_body(reader, response, 1 << 40, is_request=False)
        except TimeoutError as error:
            self.close()
            limit = self._settings.upstream_timeout_seconds
            raise UpstreamError(
                504, "timeout", f"Triton did not answer within {limit:g}s"
            ) from error
        except ProtocolError as error:
            self.close()
            message = f"unreadable answer from Triton: {error.message}"
            raise UpstreamError(502, "protocol", message) from error
        if not response.keep_alive:
            self.close()
        return response

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


@dataclass
class AccessControl:
    """Optional API keys and per-client rate limit (see access.py)."""

    keys: ApiKeys | None = None
    limiter: RateLimiter | None = None
    clients: ClientLabels = field(default_factory=ClientLabels)

    def admit(self, request: Message, peer: str, metrics: RuntimeMetrics) -> None:
        """Raise a 401 or 429 ProtocolError, or strip the credentials and let it through."""
        path = request.start.split(b" ")[1]
        if path.startswith(b"/v2/health/"):
            return
        self.check(request.headers, peer, metrics, limited=INFER_PATH.match(path) is not None)
        request.headers = [(k, v) for k, v in request.headers if k not in CREDENTIAL_HEADERS]

    def check(
        self,
        headers: list[tuple[bytes, bytes]],
        peer: str,
        metrics: RuntimeMetrics,
        *,
        limited: bool,
    ) -> None:
        """The decision for HTTP and gRPC alike: a ProtocolError (401, 429) or nothing."""
        key = presented_key(headers)
        client = client_id(key) if key and self.keys is not None else peer
        label = self.clients.label(client)
        if self.keys is not None and not self.keys.check(key):
            metrics.client_requests.labels(label, "unauthorized").inc()
            message = "missing or wrong API key: send Authorization: Bearer <key> or X-API-Key"
            raise ProtocolError(
                401, "unauthorized", message, ('www-authenticate: Bearer realm="inference"',)
            )
        if self.limiter is not None and limited:
            wait = self.limiter.wait_time(client)
            if wait > 0:
                metrics.client_requests.labels(label, "rate_limited").inc()
                retry = max(1, math.ceil(wait))
                raise ProtocolError(
                    429,
                    "rate_limited",
                    f"rate limit exceeded; retry in {retry}s",
                    (f"retry-after: {retry}",),
                )
        metrics.client_requests.labels(label, "admitted").inc()


class HttpProxy:
    def __init__(
        self,
        settings: RuntimeSettings,
        metrics: RuntimeMetrics,
        sampler: Sampler | None = None,
        rng: Callable[[], float] = random.random,
        access: AccessControl | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.sampler = sampler
        self.rng = rng
        self.access = access

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = Upstream(self.settings)
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if peername else "unknown"
        try:
            while await self._one(reader, writer, upstream, peer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            upstream.close()
            writer.close()

    async def _one(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: Upstream,
        peer: str,
    ) -> bool:
        """Serve one request; False when the connection should close."""
        try:
            request = await self._read_request(reader, peer)
        except ProtocolError as error:
            return await self._reject(writer, error)
        if request is None:
            return False
        infer = INFER_PATH.match(request.start.split(b" ")[1])
        if infer is None or not request.start.startswith(b"POST "):
            return await self._pass_through(writer, request, upstream)
        await self._infer(writer, request, upstream, infer)
        return request.keep_alive

    async def _read_request(self, reader: asyncio.StreamReader, peer: str) -> Message | None:
        head = await read_head(reader)
        if head is None:
            return None
        request = Message(head[0], head[1], received=time.perf_counter())
        if request.start.count(b" ") != 2:
            raise ProtocolError(400, "bad_request_line", "malformed request line")
        if self.access is not None:
            self.access.admit(request, peer, self.metrics)
        if request.start.startswith(b"POST ") and INFER_PATH.match(request.start.split(b" ")[1]):
            content_type = (request.header(b"content-type") or b"").split(b";")[0].strip().lower()
            if content_type and content_type not in ACCEPTED_TYPES:
                raise ProtocolError(
                    415,
                    "content_type",
                    f"unsupported content type {content_type.decode(errors='replace')!r}:"
                    " use application/json or application/octet-stream",
                )
        try:
            async with asyncio.timeout(self.settings.client_timeout_seconds):
                await read_body(reader, request, self.settings.max_body_bytes, is_request=True)
        except TimeoutError as error:
            limit = self.settings.client_timeout_seconds
            message = f"request not received within {limit:g}s"
            raise ProtocolError(408, "client_timeout", message) from error
        return request

    async def _infer(
        self,
        writer: asyncio.StreamWriter,
        request: Message,
        upstream: Upstream,
        infer: re.Match[bytes],
    ) -> None:
        model = infer.group(1).decode(errors="replace")
        version = (infer.group(2) or b"").decode(errors="replace")
        labels = (*self.metrics.bounded(model, version), self.metrics.track)
        response = Message(b"")
        self.metrics.in_flight_track.inc()
        try:
            try:
                response = await upstream.exchange(request)
                writer.write(response.encode())
                code = response.start.split(b" ", 2)[1].decode()
            except UpstreamError as error:
                self.metrics.upstream_errors.labels(error.reason).inc()
                writer.write(error_response(error.status, error.message))
                code = str(error.status)
            await writer.drain()
        finally:
            self.metrics.in_flight_track.dec()
        self.metrics.duration.labels(*labels).observe(time.perf_counter() - request.received)
        self.metrics.requests.labels(*labels, code).inc()
        self.metrics.request_bytes.labels(*labels).observe(len(request.body))
        self.metrics.response_bytes.labels(*labels).observe(len(response.body))
        if self.sampler is not None and code == "200" and self.rng() < self.settings.sample_rate:
            exchange = InferExchange(
                model, "http", request.headers, request.body, response.headers, response.body
            )
            self.sampler(exchange)

    async def _pass_through(
        self, writer: asyncio.StreamWriter, request: Message, upstream: Upstream
    ) -> bool:
        """Health, metadata and everything else: forwarded, not measured."""
        try:
            response = await upstream.exchange(request)
        except UpstreamError as error:
            self.metrics.upstream_errors.labels(error.reason).inc()
            writer.write(error_response(error.status, error.message))
        else:
            writer.write(response.encode())
        await writer.drain()
        return request.keep_alive

    async def _reject(self, writer: asyncio.StreamWriter, error: ProtocolError) -> bool:
        """Answer without Triton, count it, and close: the stream may be out of step."""
        self.metrics.rejected.labels(error.reason).inc()
        writer.write(error_response(error.status, error.message, close=True, extra=error.headers))
        await writer.drain()
        return False
