"""Strict HTTP/1.1 at the prediction API's door, parsed by llhttp (through httptools).

What the sidecar checks must be what Triton sees, so nothing is forwarded as received:

- llhttp (Node.js's parser, strict by default) rejects duplicate or conflicting
  ``Content-Length``, ``Content-Length`` beside ``Transfer-Encoding``, obs-fold, bare CR or LF,
  and chunk sizes that are not plain hex. On top of it: only ``GET`` and ``POST``, HTTP/1.0
  or 1.1, exactly one ``Host`` on 1.1, ``Transfer-Encoding`` only as ``chunked`` (and never
  on 1.0), ``Expect`` only as ``100-continue``, a path without dot segments, empty segments
  or encoded slashes. Anything else is a :class:`ProtocolError`: the client gets 4xx and the
  connection closes, because the stream may be out of step.
- The request forwarded to Triton is re-serialised from what was parsed: the canonical path,
  the end-to-end headers, and a ``Content-Length`` for the body as received (chunked bodies
  are de-chunked; trailers are dropped). Hop-by-hop headers never cross.
- Time and memory are bounded: the whole head within ``header_timeout`` of its first byte and
  within ``MAX_HEAD_BYTES``, the body within ``body_timeout`` and ``max_body``, and every
  buffered body reserves its bytes from a :class:`ByteBudget` shared by all connections.
- ``admit`` is called once the head is parsed and before any body byte is read, so keys,
  limits and sizes are decided without reading what an unknown client sends. ``Expect:
  100-continue`` gets its interim answer only after that.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httptools

MAX_HEAD_BYTES = 64 * 1024
READ_SIZE = 64 * 1024
METHODS = (b"GET", b"POST")
# Never forwarded in either direction: the proxy frames each hop itself (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"content-length",
    }
)
# Path characters that stay as they are when the canonical path is encoded again.
PATH_SAFE = "/:@!$&'()*+,;=-._~"


class ProtocolError(Exception):
    """A message the proxy will not forward; ``status`` is what the client gets."""

    def __init__(
        self, status: int, reason: str, message: str, headers: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # a bounded label for the rejection counter
        self.message = message
        self.headers = headers  # extra response headers, e.g. Retry-After


class ByteBudget:
    """Bytes of bodies buffered by all connections together; a request that would pass the
    limit is shed (503) instead of growing the sidecar's memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.limit:
            raise ProtocolError(
                503,
                "overloaded",
                "the sidecar is buffering as much as it may; retry shortly",
                ("retry-after: 1",),
            )
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size


@dataclass
class Request:
    """One parsed request: what is checked is what is forwarded."""

    method: bytes
    path: str  # canonical and decoded: "/v2/models/m/infer"
    query: bytes
    headers: list[tuple[bytes, bytes]]  # lower-cased names; end-to-end headers only
    http10: bool
    keep_alive: bool
    body: bytearray = field(default_factory=bytearray)
    received: float = 0.0  # perf_counter() when the head was parsed
    expect_continue: bool = False
    reserved: int = 0  # bytes taken from the ByteBudget, given back by ``release``
    route: object = None  # what ``admit`` decided, for the proxy
    client: str = ""  # who sent it: a key's salted hash, or the peer's address
    credentials: list[tuple[bytes, bytes]] = field(default_factory=list)  # taken off the head

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def target(self) -> bytes:
        path = urllib.parse.quote(self.path, safe=PATH_SAFE).encode()
        return path + b"?" + self.query if self.query else path

    def head(self) -> bytes:
        """The head Triton gets: re-serialised, framed by a Content-Length of its own."""
        lines = [self.method + b" " + self.target + b" HTTP/1.1"]
        if self.header(b"host") is None:  # an HTTP/1.0 client's request; 1.1 needs one
            lines.append(b"host: localhost")
        lines.extend(key + b": " + value for key, value in self.headers)
        if self.method == b"POST" or self.body:
            lines.append(b"content-length: %d" % len(self.body))
        return b"\r\n".join(lines) + b"\r\n\r\n"


def canonical_path(raw: bytes) -> tuple[str, bytes]:
    """The decoded path and the raw query of a request target (origin or absolute form)."""
    try:
        url = httptools.parse_url(raw)
    except httptools.HttpParserInvalidURLError as error:
        raise ProtocolError(400, "bad_target", "malformed request target") from error
    if url.path is None or not url.path.startswith(b"/"):
        raise ProtocolError(400, "bad_target", "the request target must be a path")
    segments = []
    for segment in url.path.split(b"/")[1:]:
        try:
            text = urllib.parse.unquote_to_bytes(segment).decode("utf-8")
        except UnicodeDecodeError as error:
            raise ProtocolError(400, "bad_target", "the path is not UTF-8") from error
        if text in ("", ".", "..") or "/" in text or not text.isprintable():
            raise ProtocolError(
                400,
                "bad_target",
                "the path has an empty, dot or encoded-slash segment, or a control character",
            )
        segments.append(text)
    return "/" + "/".join(segments), url.query or b""


class RequestParser:
    """Requests from one connection, strictly framed, pipelining kept in order.

    ``admit(request)`` runs when a head is complete and may raise a ProtocolError; it sees
    the request before any of its body is read.
    """

    def __init__(
        self,
        admit: Callable[[Request], None],
        *,
        max_body: int,
        budget: ByteBudget,
        header_timeout: float,
        body_timeout: float,
        idle_timeout: float,
    ) -> None:
        self._admit = admit
        self._max_body = max_body
        self._budget = budget
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._idle_timeout = idle_timeout
        self._parser = httptools.HttpRequestParser(self)
        self._ready: deque[Request] = deque()
        self._error: ProtocolError | None = None
        self._current: Request | None = None
        self._url = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_message = False
        self._deadline = 0.0
        self._send_continue = False

    # -- the reading loop -------------------------------------------------------------------

    async def next(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | None:
        """The next request, or None when the client closed or idled out between requests.
        A request queued before a protocol error is served before the error is raised."""
        loop = asyncio.get_running_loop()
        while True:
            if (request := self.take()) is not None:
                return request
            if self._error is not None:
                raise self._error
            if self._send_continue:
                self._send_continue = False
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if not self._in_message:
                self._deadline = loop.time() + self._idle_timeout
            try:
                async with asyncio.timeout_at(self._deadline):
                    data = await reader.read(READ_SIZE)
            except TimeoutError:
                if not self._in_message:
                    return None
                if self._current is None:
                    raise ProtocolError(
                        408,
                        "header_timeout",
                        f"request head not received within {self._header_timeout:g}s",
                    ) from None
                raise ProtocolError(
                    408,
                    "client_timeout",
                    f"request not received within {self._body_timeout:g}s",
                ) from None
            if not data:
                if not self._in_message:
                    return None
                reason = "truncated_head" if self._current is None else "truncated_body"
                raise ProtocolError(400, reason, "the request ended early")
            self.feed(data)

    def take(self) -> Request | None:
        """The oldest complete request fed so far, if any."""
        return self._ready.popleft() if self._ready else None

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            self._fail(
                cause
                if isinstance(cause, ProtocolError)
                else ProtocolError(400, "bad_http", f"malformed HTTP/1.1: {cause}")
            )
        except httptools.HttpParserUpgrade:
            # A GET asking to switch protocols (curl --http2 on http://): answered in
            # HTTP/1.1, then closed; whatever follows the head is never read.
            if self._ready and self._current is None:
                self._ready[-1].keep_alive = False
                self._error = ProtocolError(400, "upgrade", "protocol upgrades are not served")
            else:
                self._fail(ProtocolError(400, "upgrade", "protocol upgrades are not served"))
        except httptools.HttpParserError as error:
            self._fail(ProtocolError(400, "bad_http", f"malformed HTTP/1.1: {error}"))

    def _fail(self, error: ProtocolError) -> None:
        self._error = error
        self.release_current()

    def release_current(self) -> None:
        """Give back what an unfinished request reserved."""
        if self._current is not None:
            release(self._current, self._budget)
            self._current = None

    def close(self) -> None:
        """The connection is ending: give back what every request not served reserved."""
        self.release_current()
        while self._ready:
            release(self._ready.popleft(), self._budget)

    # -- llhttp's callbacks -----------------------------------------------------------------

    def _request(self) -> Request:
        if self._current is None:  # llhttp calls body callbacks only after the head
            raise ProtocolError(400, "bad_http", "a body without a head")
        return self._current

    def on_message_begin(self) -> None:
        self._in_message = True
        self._deadline = asyncio.get_running_loop().time() + self._header_timeout
        self._url.clear()
        self._headers = []
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        if self._current is None:  # not a trailer: trailers are dropped
            self._headers.append((name.lower(), value))

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise ProtocolError(
                431, "head_too_large", f"the request head exceeds {MAX_HEAD_BYTES} bytes"
            )

    def on_headers_complete(self) -> None:
        parser = self._parser
        method = parser.get_method()
        version = parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise ProtocolError(505, "bad_version", f"HTTP/{version} is not served: use 1.1")
        if method not in METHODS:
            raise ProtocolError(
                405, "bad_method", f"{method.decode()} is not served", ("allow: GET, POST",)
            )
        headers = self._headers
        names = [name for name, _ in headers]
        coding = [value.strip().lower() for name, value in headers if name == b"transfer-encoding"]
        if coding and (coding != [b"chunked"] or version == "1.0"):
            raise ProtocolError(
                400 if version == "1.0" else 501,
                "bad_transfer_encoding",
                "Transfer-Encoding must be exactly chunked, and only on HTTP/1.1",
            )
        if version == "1.1" and names.count(b"host") != 1:
            raise ProtocolError(400, "bad_host", "HTTP/1.1 needs exactly one Host header")
        expect = [value.strip().lower() for name, value in headers if name == b"expect"]
        if expect and expect != [b"100-continue"]:
            raise ProtocolError(417, "bad_expect", "only Expect: 100-continue is understood")
        path, query = canonical_path(bytes(self._url))
        request = Request(
            method=method,
            path=path,
            query=query,
            headers=[(k, v) for k, v in headers if k not in HOP_BY_HOP],
            http10=version == "1.0",
            keep_alive=parser.should_keep_alive(),
            received=time.perf_counter(),
            expect_continue=bool(expect),
        )
        self._admit(request)
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None:
            size = int(length)  # llhttp let through digits only
            if size > self._max_body:
                raise ProtocolError(
                    413, "too_large", f"body of {size} bytes exceeds the limit of {self._max_body}"
                )
            self._budget.take(size)
            request.reserved = size
        self._current = request
        self._send_continue = request.expect_continue
        self._deadline = asyncio.get_running_loop().time() + self._body_timeout

    def on_body(self, body: bytes) -> None:
        request = self._request()
        if len(request.body) + len(body) > self._max_body:
            raise ProtocolError(
                413, "too_large", f"body exceeds the limit of {self._max_body} bytes"
            )
        if len(request.body) + len(body) > request.reserved:  # chunked: reserve as it comes
            self._budget.take(len(body))
            request.reserved += len(body)
        request.body += body
        self._send_continue = False

    def on_message_complete(self) -> None:
        request = self._request()
        self._ready.append(request)
        self._current = None
        self._in_message = False
        self._send_continue = False


def release(request: Request, budget: ByteBudget) -> None:
    budget.give(request.reserved)
    request.reserved = 0


REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    417: "Expectation Failed",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def error_response(
    status: int, message: str, *, close: bool = False, extra: tuple[str, ...] = ()
) -> bytes:
    """A Triton-style JSON error: ``{"error": "..."}``."""
    body = json.dumps({"error": message}).encode()
    reason = REASONS.get(status, "Error")
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
    ]
    head.extend(extra)
    if close:
        head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def plain(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    """A small answer of the admin ports (metrics, probes)."""
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}.get(status, "Error")
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def serve_plain(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    answer: Callable[[str], Awaitable[bytes]],
    budget: ByteBudget,
    *,
    header_timeout: float,
    body_timeout: float,
    idle_timeout: float,
) -> None:
    """An admin port's connection (the sidecar's, the activator's): bodiless GETs, each
    answered by ``answer(path)``, kept alive while the client asks."""
    parser = RequestParser(
        lambda request: None,
        max_body=0,
        budget=budget,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
        idle_timeout=idle_timeout,
    )
    try:
        while (request := await parser.next(reader, writer)) is not None:
            writer.write(await answer(request.path))
            await writer.drain()
            if not request.keep_alive:
                break
    except (ProtocolError, ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
