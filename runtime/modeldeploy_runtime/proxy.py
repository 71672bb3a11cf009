"""The HTTP side of the sidecar: the only door to the local Triton's KServe v2 API.

Each client connection gets its own keep-alive connection to Triton, so requests on it are
forwarded in order with no pooling or locking. Requests are parsed strictly and forwarded
re-serialised (http1.py); what they are comes from an allowlist (routes.py). Answers are
relayed as they arrive, re-framed for the client, so ``generate_stream`` streams and a large
answer never sits whole in memory. Every inference call (infer, generate, generate_stream,
absolute-form targets included) is keyed, limited and measured; anything the door refuses
or Triton cannot answer gets a Triton-style ``{"error": ...}`` and a counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

from modeldeploy_runtime.access import CREDENTIAL_HEADERS, AccessControl
from modeldeploy_runtime.coarsen import Coarsener
from modeldeploy_runtime.http1 import (
    HOP_BY_HOP,
    READ_SIZE,
    REASONS,
    ByteBudget,
    ProtocolError,
    Request,
    RequestParser,
    error_response,
    release,
)
from modeldeploy_runtime.metrics import RuntimeMetrics
from modeldeploy_runtime.routes import Kind, Route, admin_refused, http_route
from modeldeploy_runtime.settings import RuntimeSettings
from modeldeploy_runtime.shadow import (
    MIRROR_HEADER,
    Copy,
    Mirror,
    MirrorFailure,
    ShadowConfig,
    copy_token,
    is_copy,
    mirrored_request,
)

LINGER_SECONDS = 2.0
COALESCE_BYTES = 64 * 1024  # a request body up to this is sent with its head in one write
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
    client: str  # a key's salted hash, or the peer's address
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


class Sink(Protocol):
    """Where a relayed answer goes: the client's StreamWriter, or nowhere."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class Relay:
    """Triton's answer, parsed by llhttp and written to the client as it arrives.

    The head is re-serialised (hop-by-hop headers dropped); the body keeps Triton's
    Content-Length when there is one and is chunked for the client otherwise (or delimited
    by closing the connection for an HTTP/1.0 client). Interim 1xx answers are not relayed.
    ``keep`` keeps a copy of the body for the drift sampler.
    """

    def __init__(self, client: Sink, *, http10: bool, keep: bool, hold: bool = False) -> None:
        self.client = client
        self._http10 = http10
        self._keep = keep or hold
        self._hold = hold  # nothing is written: the caller rewrites the whole answer
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._chunked = False
        self._interim = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.size = 0
        self.pieces: list[bytes] = []
        self.started = False  # something was written to the client
        self.done = False
        self.close_client = False  # the client connection must end after this answer
        self._out: list[bytes] = []  # for the client, written once per feed
        self._body_seen = False
        self.close_upstream = False
        self._close_delimited = False

    def feed(self, data: bytes) -> None:
        """Parse what Triton sent; what it makes for the client goes out in one write (one
        send call, not one per head and body piece)."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            message = f"unreadable answer from Triton: {error}"
            raise UpstreamError(502, "protocol", message) from None
        finally:
            self._flush()

    def _flush(self) -> None:
        # A head alone waits for the first body bytes (Triton often sends them in a second
        # segment a moment later): one send call for both.
        if self._out and (self._body_seen or self.done):
            self.client.write(self._out[0] if len(self._out) == 1 else b"".join(self._out))
            self._out.clear()
            self.started = True

    def eof(self) -> None:
        """Triton closed the connection: the end of a close-delimited body, or a failure."""
        if self._close_delimited and not self.done:
            self.on_message_complete()
            self._flush()
        if not self.done:
            raise ConnectionResetError("Triton closed the connection mid-answer")

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)

    def _status_line(self) -> bytes:
        reason = REASONS.get(self.status, self._reason.decode("latin-1")) or "Unknown"
        return b"HTTP/1.1 %d %s" % (self.status, reason.encode("latin-1"))

    def whole(self, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
        """A held answer, written at once with its own Content-Length."""
        lines = [self._status_line()]
        lines.extend(k + b": " + v for k, v in headers if k not in HOP_BY_HOP)
        lines.append(b"content-length: %d" % len(body))
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    # -- llhttp's callbacks -----------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self._reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True
            self.headers = []
            return
        self.status = status
        self.close_upstream = not self._parser.should_keep_alive()
        if self._hold:
            return
        has_length = any(k == b"content-length" for k, _ in self.headers)
        chunked = any(k == b"transfer-encoding" for k, _ in self.headers)
        bodyless = status in (204, 304)
        self._close_delimited = not has_length and not chunked and not bodyless
        lines = [self._status_line()]
        lines.extend(k + b": " + v for k, v in self.headers if k not in HOP_BY_HOP)
        if has_length:
            lines.extend(k + b": " + v for k, v in self.headers if k == b"content-length")
        elif not bodyless and self._http10:
            self.close_client = True  # the body ends where the connection does
        elif not bodyless:
            self._chunked = True
            lines.append(b"transfer-encoding: chunked")
        if self.close_client:
            lines.append(b"connection: close")
        self._out.append(b"\r\n".join(lines) + b"\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_seen = True
        self.size += len(body)
        if self._keep:
            self.pieces.append(body)
        if self._hold:
            return
        if self._chunked:
            self._out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self._out.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._chunked:
            self._out.append(b"0\r\n\r\n")
        self.done = True


def coarsened(coarsener: Coarsener, relay: Relay, route: Route) -> bytes:
    """A held answer with its outputs coarsened (errors pass unchanged)."""
    headers, body = relay.headers, relay.body
    if relay.status == 200:
        headers, body = coarsener.http(headers, body, route.action)
    return relay.whole(headers, body)


class Upstream:
    """One keep-alive connection to Triton (or, for the mirror, to a canary pod's sidecar at
    ``address``), opened lazily and reopened when it breaks."""

    def __init__(
        self,
        settings: RuntimeSettings,
        address: tuple[str, int] | None = None,
        timeout: float | None = None,
    ) -> None:
        self._settings = settings
        self._address = address or settings.upstream_host_port()
        self._timeout = timeout or settings.upstream_timeout_seconds
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: Request, relay: Relay) -> None:
        """Send ``request`` and relay the answer to the client; UpstreamError when Triton
        cannot be reached or does not answer in time."""
        for attempt in (1, 2):
            fresh = self._writer is None
            try:
                reader, writer = await self._connect()
                head = request.head()
                if len(request.body) <= COALESCE_BYTES:  # one send call for a small request
                    writer.write(head + request.body)
                else:  # no copy of a large body
                    writer.write(head)
                    writer.write(request.body)
                await writer.drain()
                await self._relay(reader, relay)
                return
            except (ConnectionError, asyncio.IncompleteReadError) as error:
                self.close()
                # A kept-alive connection Triton closed meanwhile: retry once on a new one,
                # unless part of an answer already reached the client.
                if fresh or attempt == 2 or relay.started:
                    message = f"Triton closed the connection: {error}"
                    raise UpstreamError(502, "connection", message) from error
        raise AssertionError("unreachable")

    async def _relay(self, reader: asyncio.StreamReader, relay: Relay) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                while not relay.done:
                    data = await reader.read(READ_SIZE)
                    if not data:
                        relay.eof()
                        break
                    relay.feed(data)
                    await relay.client.drain()  # back-pressure from the client
        except TimeoutError as error:
            self.close()
            raise UpstreamError(
                504, "timeout", f"Triton did not answer within {self._timeout:g}s"
            ) from error
        except UpstreamError:
            self.close()
            raise
        if relay.close_upstream:
            self.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is not None and self._writer is not None:
            return self._reader, self._writer
        host, port = self._address
        try:
            async with asyncio.timeout(self._settings.connect_timeout_seconds):
                self._reader, self._writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as error:
            message = f"cannot reach Triton at {host}:{port}: {error}"
            raise UpstreamError(502, "connect", message) from error
        return self._reader, self._writer

    async def get(self, path: bytes) -> tuple[int, bytes]:
        """The sidecar's own GET on Triton (readiness, statistics): status and body;
        UpstreamError when Triton is down."""
        reader, writer = await self._connect()
        writer.write(b"GET " + path + b" HTTP/1.1\r\nhost: triton\r\ncontent-length: 0\r\n\r\n")
        relay = Relay(_Discard(), http10=False, keep=True)
        try:
            await self._relay(reader, relay)
        except (ConnectionError, asyncio.IncompleteReadError) as error:
            self.close()
            message = f"Triton closed the connection: {error}"
            raise UpstreamError(502, "connection", message) from error
        return relay.status, relay.body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class MirrorConnection:
    """The mirror's connection to one canary pod's sidecar: a copy sent, its whole answer
    kept, failures told apart (shadow.MirrorFailure)."""

    def __init__(self, settings: RuntimeSettings, address: tuple[str, int]) -> None:
        self._upstream = Upstream(settings, address, settings.shadow_timeout_seconds)

    async def send(self, request: Request) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        relay = Relay(_Discard(), http10=False, keep=True)
        try:
            await self._upstream.exchange(request, relay)
        except UpstreamError as error:
            result = {"connect": "unreachable", "timeout": "timeout"}.get(error.reason, "error")
            raise MirrorFailure(result, error.message) from error
        return relay.status, relay.headers, relay.body

    def close(self) -> None:
        self._upstream.close()


class _Discard:
    """A client writer that drops what it is given."""

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


class Connections:
    """Open client connections across the listener, capped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0


class HttpProxy:
    def __init__(  # noqa: PLR0913 - settings and metrics; the rest optional, by keyword
        self,
        settings: RuntimeSettings,
        metrics: RuntimeMetrics,
        *,
        sampler: Sampler | None = None,
        rng: Callable[[], float] = random.random,
        access: AccessControl | None = None,
        budget: ByteBudget | None = None,
        coarsener: Coarsener | None = None,
        mirror: Mirror | None = None,
    ) -> None:
        self.settings = settings
        self.coarsener = coarsener
        self.mirror = mirror
        self.copy_token = copy_token(settings.client_salt)
        self.metrics = metrics
        self.sampler = sampler
        self.rng = rng
        self.access = access
        self.budget = budget or ByteBudget(settings.max_buffered_bytes)
        self.connections = Connections(settings.max_connections)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections.open >= self.connections.limit:
            self.metrics.rejected.labels("connections").inc()
            writer.write(
                error_response(503, "too many connections", close=True, extra=("retry-after: 1",))
            )
            writer.close()
            return
        self.connections.open += 1
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if peername else "unknown"
        settings = self.settings
        parser = RequestParser(
            lambda request: self._admit(request, peer),
            max_body=settings.max_body_bytes,
            budget=self.budget,
            header_timeout=settings.header_timeout_seconds,
            body_timeout=settings.client_timeout_seconds,
            idle_timeout=settings.idle_timeout_seconds,
        )
        upstream = Upstream(settings)
        try:
            while (request := await parser.next(reader, writer)) is not None:
                try:
                    if not await self._serve(writer, request, upstream):
                        break
                finally:
                    release(request, self.budget)
        except ProtocolError as error:
            await self._reject(reader, writer, error)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            parser.close()
            upstream.close()
            writer.close()
            self.connections.open -= 1

    def _admit(self, request: Request, peer: str) -> None:
        """At the end of the head, before any of the body: route, keys, limits, type."""
        route = http_route(request.method, request.path)
        request.route = route
        if route.kind is Kind.HEALTH:
            return
        if route.kind is Kind.ADMIN and not self.settings.allow_admin_apis:
            raise admin_refused(request.path)
        if route.action == "generate_stream" and self.coarsener:
            raise ProtocolError(
                403,
                "coarsened_stream",
                "this model coarsens its outputs (spec.monitoring.auth.outputs), which a"
                " stream cannot carry: use generate or infer",
            )
        if route.kind is Kind.INFER:  # before the key's limits: a 415 costs no budget
            content_type = (request.header(b"content-type") or b"").split(b";")[0].strip().lower()
            if content_type and content_type not in ACCEPTED_TYPES:
                raise ProtocolError(
                    415,
                    "content_type",
                    f"unsupported content type {content_type.decode(errors='replace')!r}:"
                    " use application/json or application/octet-stream",
                )
        request.client = peer
        if self.access is not None:
            # A shadow copy: its key is checked, its limits were taken at stable's door.
            request.client = self.access.check(
                request.headers,
                peer,
                self.metrics,
                limited=route.kind is Kind.INFER,
                copy=route.kind is Kind.INFER
                and is_copy(request.header(MIRROR_HEADER), self.copy_token),
            )
            request.credentials = [(k, v) for k, v in request.headers if k in CREDENTIAL_HEADERS]
            request.headers = [(k, v) for k, v in request.headers if k not in CREDENTIAL_HEADERS]

    async def _serve(
        self, writer: asyncio.StreamWriter, request: Request, upstream: Upstream
    ) -> bool:
        """Forward one admitted request; False when the connection should close."""
        route = cast(Route, request.route)  # set by _admit for every request it let in
        measured = route.kind is Kind.INFER
        sampled = (
            measured
            and route.action == "infer"
            and self.sampler is not None
            and self.rng() < self.settings.sample_rate
        )
        shadow = (
            self.mirror.sample(self.rng())
            if self.mirror is not None
            and measured
            and route.action == "infer"
            and request.header(MIRROR_HEADER) is None  # a copy is never copied again
            else None
        )
        coarsener = self.coarsener if route.action in ("infer", "generate") else None
        keep = sampled or shadow is not None
        relay = Relay(writer, http10=request.http10, keep=keep, hold=bool(coarsener))
        if measured:
            self.metrics.in_flight_track.inc()
        try:
            try:
                await upstream.exchange(request, relay)
                code = str(relay.status)
                if coarsener:
                    writer.write(coarsened(coarsener, relay, route))
            except UpstreamError as error:
                self.metrics.upstream_errors.labels(error.reason).inc()
                if relay.started:  # the answer is cut short: only closing can say so
                    return False
                writer.write(error_response(error.status, error.message))
                code = str(error.status)
            await writer.drain()
        finally:
            if measured:
                self.metrics.in_flight_track.dec()
        if measured:
            self._observe(request, route, relay, code, sampled)
        if shadow is not None and code == "200" and self.mirror is not None:
            self._mirror(request, route, relay, shadow)
        return request.keep_alive and not relay.close_client

    def _mirror(self, request: Request, route: Route, relay: Relay, config: ShadowConfig) -> None:
        """Hand a copy to the mirror, after the client has its answer. Stable's answer is
        compared as the client saw it: coarsened, when outputs are (the canary's are too)."""
        headers, body = relay.headers, relay.body
        if self.coarsener is not None:
            headers, body = self.coarsener.http(headers, body, route.action)
        cast(Mirror, self.mirror).submit(
            Copy(
                mirrored_request(request, request.credentials, self.copy_token),
                headers,
                body,
                time.perf_counter() - request.received,
                config,
            )
        )

    def _observe(
        self, request: Request, route: Route, relay: Relay, code: str, sampled: bool
    ) -> None:
        labels = (*self.metrics.bounded(route.model, route.version), self.metrics.track)
        self.metrics.duration.labels(*labels).observe(time.perf_counter() - request.received)
        self.metrics.requests.labels(*labels, code).inc()
        self.metrics.request_bytes.labels(*labels).observe(len(request.body))
        self.metrics.response_bytes.labels(*labels).observe(relay.size)
        if sampled and code == "200" and self.sampler is not None:
            exchange = InferExchange(
                route.model,
                "http",
                request.client,
                request.headers,
                bytes(request.body),
                relay.headers,
                relay.body,
            )
            self.sampler(exchange)

    async def _reject(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: ProtocolError
    ) -> None:
        """Answer without Triton, count it, and close: the stream may be out of step.

        A client still sending a refused body would get a reset that can destroy the answer
        before it reads it; so, as nginx's lingering close, what it sends for a little while
        longer is read and dropped (never kept) before the connection closes."""
        self.metrics.rejected.labels(error.reason).inc()
        writer.write(error_response(error.status, error.message, close=True, extra=error.headers))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(LINGER_SECONDS):
                while await reader.read(READ_SIZE):
                    pass
