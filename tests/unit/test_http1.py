"""The sidecar's HTTP/1.1 front: strict framing, what is forwarded, and a fuzz of the parser.

The fuzz runs a bounded number of examples in ``make test``; ``make fuzz`` runs many more
(``FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeldeploy_runtime.http1 import ByteBudget, ProtocolError, Request, RequestParser, release

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))


class Writer:
    """Collects what the parser writes back (100 Continue)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def new_parser(budget: ByteBudget, max_body: int = 1024, admit: object = None) -> RequestParser:
    return RequestParser(
        admit if callable(admit) else (lambda request: None),
        max_body=max_body,
        budget=budget,
        header_timeout=5,
        body_timeout=5,
        idle_timeout=5,
    )


def parse(
    data: bytes,
    *,
    max_body: int = 1024,
    budget: ByteBudget | None = None,
    admit: object = None,
) -> tuple[list[Request], ProtocolError | None, bytes]:
    """Every request in ``data`` and the error that ended the stream, if any."""

    async def run() -> tuple[list[Request], ProtocolError | None, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        writer = Writer()
        parser = new_parser(budget or ByteBudget(1 << 20), max_body, admit)
        requests: list[Request] = []
        try:
            while (request := await parser.next(reader, writer)) is not None:  # type: ignore[arg-type]
                requests.append(request)
        except ProtocolError as error:
            return requests, error, bytes(writer.data)
        return requests, None, bytes(writer.data)

    return asyncio.run(run())


def one(data: bytes, **kwargs: object) -> Request:
    requests, error, _ = parse(data, **kwargs)  # type: ignore[arg-type]
    assert error is None, error.message
    assert len(requests) == 1
    return requests[0]


def refused(data: bytes, **kwargs: object) -> ProtocolError:
    requests, error, _ = parse(data, **kwargs)  # type: ignore[arg-type]
    assert error is not None, f"accepted: {[(r.method, r.path, bytes(r.body)) for r in requests]}"
    assert not requests
    return error


INFER = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n"


def test_what_is_forwarded_is_re_serialised_from_what_was_parsed() -> None:
    raw = INFER + b"Content-Length: 5\r\nX-Case: KeepMe\r\nConnection: keep-alive\r\n\r\nhello"
    request = one(raw)
    assert bytes(request.body) == b"hello"
    assert request.head() == (
        b"POST /v2/models/m/infer HTTP/1.1\r\nhost: x\r\nx-case: KeepMe\r\n"
        b"content-length: 5\r\n\r\n"
    )


def test_chunked_bodies_are_de_chunked_and_trailers_dropped() -> None:
    raw = (
        INFER
        + b"Transfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n"
    )
    request = one(raw)
    assert bytes(request.body) == b"abcde"
    assert b"transfer-encoding" not in request.head()
    assert b"x-t" not in request.head()
    assert request.head().endswith(b"content-length: 5\r\n\r\n")


def test_absolute_form_and_percent_encoding_are_canonical() -> None:
    request = one(b"POST http://other/v2/models/m/%69nfer?a=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert request.path == "/v2/models/m/infer"
    assert request.target == b"/v2/models/m/infer?a=1"


def test_pipelined_requests_come_in_order() -> None:
    raw = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    requests, error, _ = parse(raw)
    assert error is None
    assert [r.path for r in requests] == ["/a", "/b"]


def test_a_request_before_a_bad_one_is_still_served() -> None:
    raw = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"
    requests, error, _ = parse(raw)
    assert [r.path for r in requests] == ["/a"]
    assert error is not None
    assert error.status == 400


def test_expect_100_continue_is_answered_once_the_head_is_admitted() -> None:
    raw = INFER + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    _, error, written = parse(raw)
    assert written == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert error is not None
    assert error.reason == "truncated_body"

    def deny(request: Request) -> None:
        raise ProtocolError(401, "unauthorized", "no key")

    _, error, written = parse(raw, admit=deny)
    assert written == b""  # refused before the client sends its body
    assert error is not None
    assert error.status == 401


def test_admission_happens_before_any_body_byte_is_kept() -> None:
    seen: list[int] = []

    def admit(request: Request) -> None:
        seen.append(len(request.body))
        raise ProtocolError(401, "unauthorized", "no key")

    assert refused(INFER + b"Content-Length: 3\r\n\r\nabc", admit=admit).status == 401
    assert seen == [0]


def test_bodies_reserve_from_the_shared_budget_and_overflow_is_shed() -> None:
    budget = ByteBudget(10)
    budget.take(8)
    error = refused(INFER + b"Content-Length: 3\r\n\r\nabc", budget=budget)
    assert (error.status, error.reason) == (503, "overloaded")
    assert error.headers == ("retry-after: 1",)
    assert budget.used == 8
    chunked = INFER + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n1\r\nb\r\n1\r\nc\r\n0\r\n\r\n"
    assert refused(chunked, budget=budget).status == 503
    assert budget.used == 8  # the refused request's share was given back
    request = one(INFER + b"Content-Length: 2\r\n\r\nab", budget=budget)
    assert (request.reserved, budget.used) == (2, 10)


HOSTILE = {
    # Request smuggling: every framing ambiguity is refused, never guessed.
    "duplicate-content-length": (
        INFER + b"Content-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
        400,
    ),
    "duplicate-same-length": (INFER + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "content-length-list": (INFER + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    "content-length-plus": (INFER + b"Content-Length: +3\r\n\r\nabc", 400),
    "cl-te": (INFER + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te-cl": (INFER + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
    "te-space-before-colon": (INFER + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    "te-twice": (
        INFER + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        400,
    ),
    "te-not-chunked": (INFER + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
    "te-gzip-chunked": (INFER + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "te-on-http-1.0": (
        b"POST /v2/models/m/infer HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "bare-lf": (b"POST /v2/models/m/infer HTTP/1.1\nHost: x\nContent-Length: 0\n\n", 400),
    "bare-lf-in-headers": (INFER + b"X-A: 1\nContent-Length: 0\r\n\r\n", 400),
    "bare-cr": (INFER + b"X-A: 1\rContent-Length: 0\r\n\r\n", 400),
    "obs-fold": (INFER + b"X-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n", 400),
    "chunk-size-0x": (INFER + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n", 400),
    "chunk-size-underscore": (
        INFER + b"Transfer-Encoding: chunked\r\n\r\n1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
        400,
    ),
    "chunk-size-negative": (
        INFER + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "chunk-size-space": (INFER + b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
    "nul-in-header": (INFER + b"X-A: a\x00b\r\n\r\n", 400),
    # What Triton's API never needs.
    "http-0.9": (b"GET /v2/health/ready\r\n\r\n", 505),
    "http-2.0-line": (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "no-host": (b"GET /v2 HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET /v2 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "head-method": (b"HEAD /v2 HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "connect-method": (b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "expect-other": (INFER + b"Expect: 200-ok\r\nContent-Length: 0\r\n\r\n", 417),
    "dot-segment": (b"POST /v2/models/m/../n/infer HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "encoded-slash": (b"POST /v2/models/m%2Fn/infer HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "empty-segment": (b"POST //v2/models/m/infer HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "encoded-nul": (b"GET /v2/models/m%00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "asterisk": (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "head-too-large": (INFER + b"X-A: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    "body-too-large": (INFER + b"Content-Length: 2048\r\n\r\n", 413),
    "chunked-too-large": (
        INFER + b"Transfer-Encoding: chunked\r\n\r\n800\r\n" + b"a" * 2048 + b"\r\n0\r\n\r\n",
        413,
    ),
    "truncated-body": (INFER + b"Content-Length: 10\r\n\r\nshort", 400),
    "truncated-head": (b"GET /v2 HTTP/1.1\r\nHost:", 400),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_requests_are_refused_with_the_right_status(name: str) -> None:
    data, status = HOSTILE[name]
    error = refused(data)
    assert error.status == status, error.message
    assert error.message


def test_a_protocol_upgrade_is_answered_in_http_1_1_then_closed() -> None:
    raw = (
        b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\nGET /b HTTP/1.1"
    )
    requests, error, _ = parse(raw)
    assert [r.path for r in requests] == ["/v2"]
    assert not requests[0].keep_alive
    assert error is not None
    assert error.reason == "upgrade"


def test_http_1_0_and_connection_close_end_the_connection() -> None:
    old = one(b"GET /v2 HTTP/1.0\r\n\r\n")
    assert not old.keep_alive
    assert old.head() == b"GET /v2 HTTP/1.1\r\nhost: localhost\r\n\r\n"  # forwarded as 1.1
    assert one(b"GET /v2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not one(b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").keep_alive


def test_a_closed_idle_connection_is_not_an_error() -> None:
    assert parse(b"") == ([], None, b"")


# -- fuzz ---------------------------------------------------------------------------------

TOKENS = [
    b"POST ",
    b"GET ",
    b"/v2/models/m/infer",
    b"/v2/health/ready",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b"\r\n",
    b"\n",
    b"\r",
    b"Host: x",
    b"Content-Length: ",
    b"Transfer-Encoding: ",
    b"chunked",
    b"identity",
    b"Expect: 100-continue",
    b"Connection: close",
    b" ",
    b"\t",
    b":",
    b";",
    b",",
    b"0",
    b"3",
    b"5",
    b"a",
    b"ff",
    b"-1",
    b"0x",
    b"abc",
    b"\x00",
    b"%2F",
    b"/../",
]
messy = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=6), max_size=40).map(b"".join)


def reparse(request: Request) -> Request:
    """What Triton would read from the bytes the sidecar forwards."""
    forwarded = request.head() + bytes(request.body)
    requests, error, _ = parse(forwarded, max_body=1 << 20)
    assert error is None, f"forwarded bytes do not parse: {forwarded!r}: {error.message}"
    assert len(requests) == 1, f"forwarded bytes hold {len(requests)} requests: {forwarded!r}"
    return requests[0]


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize="FUZZ_EXAMPLES" not in os.environ,
)
@given(messy)
def test_fuzz_the_parser_refuses_or_forwards_exactly_what_it_checked(data: bytes) -> None:
    """Any bytes: only ProtocolErrors, and every accepted request forwards as exactly one
    request with the same method, path, headers and body (no smuggling through re-framing)."""
    requests, _, _ = parse(data)
    for request in requests:
        again = reparse(request)
        assert (again.method, again.path, again.query) == (
            request.method,
            request.path,
            request.query,
        )
        added = [] if request.header(b"host") else [(b"host", b"localhost")]  # 1.0 to 1.1
        assert again.headers == added + request.headers
        assert again.body == request.body


def test_requests_never_served_give_their_reservations_back() -> None:
    """A connection that ends with pipelined requests still queued (an error, a close)."""

    async def run() -> None:
        budget = ByteBudget(1 << 20)
        parser = new_parser(budget)
        body = INFER + b"Content-Length: 3\r\n\r\nabc"
        parser.feed(body + body + INFER + b"Content-Length: 9\r\n\r\nabc")
        assert budget.used == 3 + 3 + 9
        served = parser.take()
        assert served is not None
        release(served, budget)
        parser.close()
        assert budget.used == 0

    asyncio.run(run())
