"""The Prometheus provider's robustness: every malformed answer, a server that never answers
and one that trickles are a ProviderError (inconclusive) within the timeout, never another
exception or a hang. Local sockets only; the real Prometheus is in tests/prometheus."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import pytest

from modeldeploy_operator.metrics.prometheus import (
    DEFAULT_TIMEOUT,
    PrometheusProvider,
    ProviderError,
    parse_result,
)
from support import local_server


def success(kind: str, result: Any) -> bytes:
    return json.dumps(
        {"status": "success", "data": {"resultType": kind, "result": result}}
    ).encode()


def vector(*values: Any) -> bytes:
    return success(
        "vector", [{"metric": {"i": str(i)}, "value": [1.7e9, v]} for i, v in enumerate(values)]
    )


def document(doc: Any) -> bytes:
    return json.dumps(doc).encode()


GOOD: list[tuple[str, bytes, float | None]] = [
    ("one-series", vector("0.25"), 0.25),
    ("empty-vector", vector(), None),
    ("nan-is-no-data", vector("NaN"), None),  # 0/0: no traffic
    ("scalar", success("scalar", [1, "3"]), 3.0),
]

# (id, body, what the ProviderError says)
MALFORMED: list[tuple[str, bytes, str]] = [
    ("not-json", b"<html>502 Bad Gateway</html>", "not JSON"),
    ("not-utf8", b"\xff\xfe\x00", "not JSON"),
    ("empty-body", b"", "not JSON"),
    ("json-list", b"[1, 2]", "not an object"),
    ("json-string", b'"success"', "not an object"),
    ("json-null", b"null", "not an object"),
    ("error", document({"status": "error", "errorType": "bad_data", "error": "x"}), "bad_data: x"),
    ("status-missing", document({"data": {}}), "error: unknown"),
    ("data-missing", document({"status": "success"}), "without data"),
    ("data-a-list", document({"status": "success", "data": []}), "without data"),
    ("matrix", success("matrix", []), "expected a vector or scalar, got matrix"),
    ("result-not-a-list", success("vector", {}), "expected a list of series"),
    ("several-series", vector("1", "2"), "expected one series, got 2"),
    ("series-not-an-object", success("vector", [5]), "a series with a value"),
    ("native-histogram", success("vector", [{"histogram": [1, {}]}]), "a series with a value"),
    ("value-not-a-pair", vector(["1"]), "expected a sample"),
    ("value-a-number", success("vector", [{"value": [1, 0.5]}]), "expected a sample"),
    ("value-too-short", success("vector", [{"value": ["1"]}]), "expected a sample"),
    ("value-not-numeric", vector("fast"), "not a number"),
    ("plus-inf", vector("+Inf"), "+Inf"),
    ("minus-inf", vector("-Inf"), "-Inf"),
    ("scalar-malformed", success("scalar", "3"), "expected a sample"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in GOOD], ids=[c[0] for c in GOOD])
def test_well_formed_answers(body: bytes, expected: float | None) -> None:
    assert parse_result(body) == expected


@pytest.mark.parametrize(
    ("body", "message"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_answers_are_provider_errors(body: bytes, message: str) -> None:
    with pytest.raises(ProviderError) as caught:
        parse_result(body)
    assert message in str(caught.value)


# -- over real sockets ------------------------------------------------------------------------

Handler = Callable[[socket.socket], None]


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], str]]:
    """Start a TCP server on 127.0.0.1 whose connections ``handler`` serves; its URL."""
    with ExitStack() as servers:
        yield lambda handler: servers.enter_context(local_server(handler))


def blackhole(stop: threading.Event) -> Handler:
    """Accept, read the request, never answer (until the test ends)."""

    def handle(conn: socket.socket) -> None:
        with conn:
            stop.wait(30)

    return handle


def answer(body: bytes, status: str = "200 OK", drip: float | None = None) -> Handler:
    """Answer with ``body``; with ``drip``, one byte every ``drip`` seconds."""

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            conn.sendall(head)
            if drip is None:
                conn.sendall(body)
                return
            try:
                for byte in body:
                    conn.sendall(bytes([byte]))
                    time.sleep(drip)
            except OSError:
                return  # the client gave up

    return handle


def timed_query(provider: PrometheusProvider, limit: float) -> tuple[BaseException | None, float]:
    """Run one query in a thread; fail the test (instead of hanging it) past ``limit``."""
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(provider.query, "up")
        error = future.exception(timeout=limit)
    return error, time.monotonic() - started


def test_the_default_timeout() -> None:
    assert DEFAULT_TIMEOUT == 5.0
    assert PrometheusProvider("http://prometheus:9090").timeout == 5.0


def test_a_prometheus_that_never_answers_is_an_error_within_the_timeout(
    serve: Callable[[Handler], str],
) -> None:
    stop = threading.Event()
    url = serve(blackhole(stop))
    try:
        error, took = timed_query(PrometheusProvider(url, timeout=0.5), limit=10)
    finally:
        stop.set()
    assert isinstance(error, ProviderError), error
    assert "did not answer within 0.5 s" in str(error)
    assert took < 2


def test_a_trickling_prometheus_is_an_error_within_the_timeout(
    serve: Callable[[Handler], str],
) -> None:
    """Each byte comes well within the socket timeout; the whole answer would take 40 s."""
    url = serve(answer(vector("1") + b" " * 200, drip=0.2))
    error, took = timed_query(PrometheusProvider(url, timeout=1), limit=15)
    assert isinstance(error, ProviderError), error
    assert "did not answer within 1 s" in str(error)
    assert took < 3


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (answer(b"upstream down", status="502 Bad Gateway"), "not JSON"),
        (answer(vector("+Inf")), "+Inf"),
        (
            answer(document({"status": "error", "errorType": "timeout", "error": "timed out"}),
                   status="503 Service Unavailable"),
            "timeout: timed out",
        ),
    ],
    ids=["proxy-error-page", "infinite", "status-error-503"],
)  # fmt: skip
def test_malformed_answers_over_http(
    serve: Callable[[Handler], str], handler: Handler, message: str
) -> None:
    with pytest.raises(ProviderError, match=message.replace("+", r"\+")):
        PrometheusProvider(serve(handler), timeout=2).query("up")


def test_garbage_instead_of_http_is_an_error(serve: Callable[[Handler], str]) -> None:
    def garbage(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    with pytest.raises(ProviderError, match="unreachable"):
        PrometheusProvider(serve(garbage), timeout=2).query("up")


def test_a_connection_closed_mid_answer_is_an_error(serve: Callable[[Handler], str]) -> None:
    def cut(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"status"')

    with pytest.raises(ProviderError):
        PrometheusProvider(serve(cut), timeout=2).query("up")


def test_the_query_asks_prometheus_to_stop_at_the_same_timeout() -> None:
    seen: list[tuple[str, float]] = []

    def fetch(url: str, timeout: float) -> bytes:
        seen.append((url, timeout))
        return vector("1")

    PrometheusProvider("http://prometheus:9090/", timeout=2.5, fetch=fetch).query("up")
    assert seen == [("http://prometheus:9090/api/v1/query?query=up&timeout=2.5", 2.5)]
