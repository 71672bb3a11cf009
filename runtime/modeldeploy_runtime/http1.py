"""Just enough HTTP/1.1 for a transparent proxy: read one message, keep its bytes.

Messages are kept as raw bytes (head and body) so the proxy forwards exactly what it got,
Triton's binary tensor extension included. Only ``Content-Length`` and ``chunked`` bodies
are understood; anything the proxy cannot frame is a :class:`ProtocolError` with the status
to answer.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

MAX_HEAD_BYTES = 64 * 1024


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


@dataclass
class Message:
    """One request or response: the start line, headers (lower-cased names) and body."""

    start: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    received: float = 0.0  # perf_counter() when the head was read

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def keep_alive(self) -> bool:
        connection = (self.header(b"connection") or b"").lower()
        if self.start.startswith(b"HTTP/1.0") or self.start.endswith(b"HTTP/1.0"):
            return connection == b"keep-alive"
        return connection != b"close"

    def encode(self) -> bytes:
        """The message as received; chunked or close-delimited bodies get a Content-Length.

        Headers are kept verbatim otherwise, so a response to HEAD keeps its Content-Length.
        """
        chunked = (self.header(b"transfer-encoding") or b"").lower() == b"chunked"
        reframe = chunked or (self.header(b"content-length") is None and self.body)
        lines = [self.start]
        for key, value in self.headers:
            if reframe and key in (b"transfer-encoding", b"content-length"):
                continue
            lines.append(key + b": " + value)
        if reframe:
            lines.append(b"content-length: " + str(len(self.body)).encode())
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """The start line and headers, or None when the peer closed between messages."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if not error.partial.strip():
            return None
        raise ProtocolError(400, "truncated_head", "the request head ended early") from error
    except asyncio.LimitOverrunError as error:
        raise ProtocolError(431, "head_too_large", "request headers are too large") from error
    lines = raw[:-4].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(400, "bad_header", f"malformed header line: {line[:80]!r}")
        headers.append((name.lower(), value.strip()))
    return lines[0], headers


def has_no_body(request_start: bytes, response_start: bytes) -> bool:
    """Responses to HEAD, and 1xx, 204 and 304 responses, carry no body whatever they say."""
    status = response_start.split(b" ", 2)[1] if response_start.count(b" ") >= 1 else b""
    return request_start.startswith(b"HEAD ") or status[:1] == b"1" or status in (b"204", b"304")


async def read_body(
    reader: asyncio.StreamReader, message: Message, max_bytes: int, *, is_request: bool
) -> None:
    """Fill ``message.body`` according to its framing."""
    if (message.header(b"transfer-encoding") or b"").lower() == b"chunked":
        message.body = await _read_chunked(reader, max_bytes)
        return
    length = message.header(b"content-length")
    if length is None:
        if is_request:
            return  # no body
        message.body = await reader.read(-1)  # a response delimited by the connection's close
        if len(message.body) > max_bytes:
            raise ProtocolError(502, "too_large", f"response exceeds {max_bytes} bytes")
        return
    if not length.isdigit():
        raise ProtocolError(400, "bad_length", "Content-Length is not a number")
    size = int(length)
    if size > max_bytes:
        raise ProtocolError(
            413, "too_large", f"body of {size} bytes exceeds the limit of {max_bytes}"
        )
    try:
        message.body = await reader.readexactly(size)
    except asyncio.IncompleteReadError as error:
        raise ProtocolError(
            400, "truncated_body", f"body ended after {len(error.partial)} of {size} bytes"
        ) from error


async def _read_chunked(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # trailers end
            return b"".join(parts)
        total += size
        if total > max_bytes:
            raise ProtocolError(413, "too_large", f"body exceeds the limit of {max_bytes} bytes")
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    408: "Request Timeout",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
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
