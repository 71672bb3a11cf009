"""HTTP/1.1 framing in the sidecar: what is read, and what is forwarded."""

from __future__ import annotations

import asyncio

import pytest

from modeldeploy_runtime.http1 import Message, ProtocolError, has_no_body, read_body, read_head


def stream(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    """A reader holding ``data``; call it inside a running loop."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def read(data: bytes, is_request: bool = True, max_bytes: int = 1024) -> Message:
    reader = stream(data)
    head = await read_head(reader)
    assert head is not None
    message = Message(*head)
    await read_body(reader, message, max_bytes, is_request=is_request)
    return message


def test_content_length_body_is_forwarded_verbatim() -> None:
    head = b"POST /v2/models/m/infer HTTP/1.1\r\n"
    raw = head + b"Host: x\r\nContent-Length: 5\r\nX-Case: KeepMe\r\n\r\nhello"
    message = asyncio.run(read(raw))
    assert message.body == b"hello"
    assert message.header(b"x-case") == b"KeepMe"
    assert message.encode() == head + b"host: x\r\ncontent-length: 5\r\nx-case: KeepMe\r\n\r\nhello"


def test_chunked_body_is_reframed_with_a_length() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    message = asyncio.run(read(raw, is_request=False))
    assert message.body == b"abcde"
    assert message.encode().endswith(b"content-length: 5\r\n\r\nabcde")
    assert b"transfer-encoding" not in message.encode()


def test_close_delimited_response_is_read_to_the_end() -> None:
    message = asyncio.run(
        read(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 3000, is_request=False, max_bytes=10_000)
    )
    assert len(message.body) == 3000
    assert not message.keep_alive


def test_head_and_bodyless_statuses() -> None:
    assert has_no_body(b"HEAD / HTTP/1.1", b"HTTP/1.1 200 OK")
    assert has_no_body(b"GET / HTTP/1.1", b"HTTP/1.1 204 No Content")
    assert has_no_body(b"GET / HTTP/1.1", b"HTTP/1.1 304 Not Modified")
    assert not has_no_body(b"GET / HTTP/1.1", b"HTTP/1.1 200 OK")
    head_response = Message(b"HTTP/1.1 200 OK", [(b"content-length", b"42")])
    assert head_response.encode() == b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n"  # kept as is


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST / HTTP/1.1\r\nContent-Length: 9999\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort", 400),
        (b"POST / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
    ],
)
def test_malformed_requests_are_protocol_errors(raw: bytes, status: int) -> None:
    with pytest.raises(ProtocolError) as caught:
        asyncio.run(read(raw))
    assert caught.value.status == status


def test_a_closed_idle_connection_is_not_an_error() -> None:
    async def idle() -> object:
        return await read_head(stream(b""))

    assert asyncio.run(idle()) is None
