"""Every call the operator makes to the Kubernetes API has a timeout, and the flags set them:
an API server that accepts and never answers is an ApiError within the timeout, not a
reconcile that hangs. (The Prometheus provider's own are in test_prometheus.py.)"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kubernetes import client as k8s

from modeldeploy_operator.__main__ import build_context, parse_args
from modeldeploy_operator.k8s.client import (
    DEFAULT_TIMEOUT,
    THROTTLE_RETRIES,
    ApiError,
    KubernetesApi,
    WatchStalled,
    api_client,
    retry_after,
)
from modeldeploy_operator.metrics.prometheus import PrometheusProvider
from modeldeploy_operator.telemetry import Telemetry
from support import local_server


@pytest.fixture
def silent_server() -> Iterator[str]:
    """An HTTP "server" on 127.0.0.1 that accepts connections and never answers."""
    held: list[socket.socket] = []
    with local_server(held.append) as url:
        yield url
    for conn in held:
        conn.close()


def api_for(url: str, timeout: tuple[float, float]) -> KubernetesApi:
    return KubernetesApi(k8s.ApiClient(k8s.Configuration(host=url)), timeout=timeout)


def pod_watch(api: KubernetesApi) -> Iterator[dict[str, Any]]:
    """A watch of pods that counts 1 s without a byte as a stall."""
    return api.watch(
        "v1",
        "Pod",
        "ns",
        selector="",
        resource_version="1",
        timeout_seconds=300,
        inactivity_seconds=1.0,
    )


def within(limit: float, call: Callable[[], Any]) -> tuple[BaseException | None, float]:
    """Run ``call`` in a thread; fail (instead of hanging the test run) past ``limit``."""
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        error = pool.submit(call).exception(timeout=limit)
    return error, time.monotonic() - started


def test_the_default_is_ten_seconds_to_connect_and_to_read() -> None:
    assert DEFAULT_TIMEOUT == (10.0, 10.0)
    assert KubernetesApi(k8s.ApiClient()).timeout == (10.0, 10.0)


def test_a_write_to_a_silent_api_server_times_out(silent_server: str) -> None:
    api = api_for(silent_server, (0.5, 0.5))
    error, took = within(10, lambda: api.patch_status("ns", "m", {"phase": "Pending"}))
    assert isinstance(error, ApiError), error
    assert (error.status, error.reason) == (0, "Timeout")
    assert "no answer within 0.5 s" in error.message
    assert took < 2  # PATCH is not retried


def test_a_read_from_a_silent_api_server_times_out(silent_server: str) -> None:
    api = api_for(silent_server, (0.5, 0.5))
    error, took = within(20, lambda: api.get("apps/v1", "Deployment", "ns", "m"))
    assert isinstance(error, ApiError), error
    assert (error.status, error.reason) == (0, "Timeout")
    assert took < 5  # urllib3 retries an idempotent read up to 3 times


def test_a_watch_stream_that_goes_silent_is_a_stall_within_the_inactivity_timeout() -> None:
    """The server opens the stream and sends one event, then nothing (no bookmark, no end):
    the read timeout is the watch's inactivity timeout, not the server's timeoutSeconds."""
    held: list[socket.socket] = []

    def one_event_then_silence(conn: socket.socket) -> None:
        held.append(conn)
        conn.recv(65536)
        event = b'{"type":"ADDED","object":{"metadata":{"name":"a","resourceVersion":"2"}}}\n'
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(event):x}\r\n".encode() + event + b"\r\n"
        )

    seen: list[dict[str, Any]] = []
    with local_server(one_event_then_silence) as url:
        api = api_for(url, (0.5, 0.5))
        events = pod_watch(api)
        error, took = within(10, lambda: seen.extend(events))
    for conn in held:
        conn.close()
    assert [e["object"]["metadata"]["name"] for e in seen] == ["a"]
    assert isinstance(error, WatchStalled), error
    assert "nothing for 1 s" in error.message
    assert 1.0 <= took < 5


def test_a_refused_connection_is_an_api_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again: nothing listens there
    api = api_for(f"http://127.0.0.1:{port}", (0.5, 0.5))
    with pytest.raises(ApiError) as caught:
        api.list("v1", "Pod", "ns")
    assert (caught.value.status, caught.value.reason) == (0, "ConnectionFailed")


def test_the_flags_set_the_timeouts() -> None:
    args = parse_args(["--api-timeout", "3", "--prometheus-timeout", "2.5"])
    ctx = build_context(args, k8s.ApiClient(), Telemetry(), logging.getLogger("test"))
    assert isinstance(ctx.api, KubernetesApi)
    assert ctx.api.timeout == (3.0, 3.0)
    assert ctx.api_timeout == 3.0
    provider = ctx.metrics_provider("http://prometheus:9090")
    assert isinstance(provider, PrometheusProvider)
    assert provider.timeout == 2.5


def test_the_default_flags() -> None:
    ctx = build_context(parse_args([]), k8s.ApiClient(), Telemetry(), logging.getLogger("test"))
    assert isinstance(ctx.api, KubernetesApi)
    assert ctx.api.timeout == (10.0, 10.0)
    provider = ctx.metrics_provider("http://prometheus:9090")
    assert isinstance(provider, PrometheusProvider)
    assert provider.timeout == 5.0


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_timeouts_must_be_positive(value: str) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--api-timeout", value])


class Throttling(http.server.BaseHTTPRequestHandler):
    """An API server whose flow control answers 429 (Retry-After) ``refusals`` times, then
    the object."""

    refusals = 0
    seen = 0

    def do_GET(self) -> None:
        type(self).seen += 1
        if type(self).seen <= type(self).refusals:
            body, code, extra = b'{"kind":"Status","code":429}', 429, {"Retry-After": "3"}
        else:
            body, code, extra = b'{"kind":"Deployment","metadata":{"name":"x"}}', 200, {}
        self.send_response(code)
        for key, value in {**extra, "Content-Type": "application/json"}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("refusals", "answered"), [(2, True), (THROTTLE_RETRIES + 1, False)])
def test_a_throttled_request_waits_its_retry_after_and_goes_again(
    refusals: int, answered: bool
) -> None:
    """API Priority and Fairness refuses with 429 and Retry-After: the request did not run, so
    it is sent again after the wait (on a fake clock here), a bounded number of times."""
    Throttling.refusals, Throttling.seen = refusals, 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Throttling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    waits: list[float] = []
    codes: list[int] = []
    api = KubernetesApi(
        api_client(k8s.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")),
        on_request=lambda verb, kind, code: codes.append(code),
        sleep=waits.append,
    )
    try:
        if answered:
            found = api.get("apps/v1", "Deployment", "ns", "x")
            assert found is not None
            assert found["metadata"]["name"] == "x"
            assert waits == [3.0, 3.0]
            assert codes == [429, 429, 200]  # every refusal counted in the request metrics
        else:
            with pytest.raises(ApiError) as refused:
                api.get("apps/v1", "Deployment", "ns", "x")
            assert refused.value.status == 429
            assert waits == [3.0] * THROTTLE_RETRIES
    finally:
        server.shutdown()
        server.server_close()


def test_retry_after_is_bounded() -> None:
    assert retry_after("3") == 3.0
    assert retry_after(None) == 1.0
    assert retry_after("soon") == 1.0
    assert retry_after("3600") == 10.0
    assert retry_after("0") == 0.1


class Silencing(http.server.BaseHTTPRequestHandler):
    """An API server over keep-alive connections; once ``silence`` is set, every connection
    opened before it stops answering (a middlebox that lost its state), new ones answer."""

    protocol_version = "HTTP/1.1"
    silence = threading.Event()
    release = threading.Event()
    connections = 0

    def setup(self) -> None:
        super().setup()
        type(self).connections += 1
        self.opened_after_silence = self.silence.is_set()

    def answer(self) -> None:
        if self.silence.is_set() and not self.opened_after_silence:
            self.release.wait(10)  # silent until the test ends
            self.close_connection = True
            return
        time.sleep(0.2)  # so that concurrent requests need connections of their own
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path.startswith("/api/v1/namespaces/ns/pods?") and "watch=true" in self.path:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            self.release.wait(10)  # a watch that hears nothing
            self.close_connection = True
            return
        body = b'{"kind":"Deployment","metadata":{"name":"x"}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PATCH = answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def silencing() -> Iterator[str]:
    Silencing.silence.clear()
    Silencing.release.clear()
    Silencing.connections = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Silencing)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        Silencing.release.set()
        server.shutdown()
        server.server_close()


def pool_two_connections(api: KubernetesApi) -> None:
    with ThreadPoolExecutor(2) as pool:
        for found in pool.map(lambda _: api.get("apps/v1", "Deployment", "ns", "x"), range(2)):
            assert found is not None
    assert Silencing.connections == 2


def two_writes_at_once(api: KubernetesApi) -> list[tuple[BaseException | None, float]]:
    """urllib3's pool is last in, first out, and a dropped connection's place is taken by a
    new one: one write alone would never reach an older, silent connection; two at once do."""

    def write(_: int) -> tuple[BaseException | None, float]:
        return within(10, lambda: api.patch_status("ns", "m", {"phase": "Pending"}))

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(write, range(2)))


def test_a_timed_out_write_closes_the_other_idle_connections_too(silencing: str) -> None:
    """Two keep-alive connections in the pool go silent together. The first write times out
    on one; the next writes open new connections instead of waiting out the other."""
    api = api_for(silencing, (0.5, 0.5))
    pool_two_connections(api)
    Silencing.silence.set()
    error, _ = within(10, lambda: api.patch_status("ns", "m", {"phase": "Pending"}))
    assert isinstance(error, ApiError), error
    assert (error.status, error.reason) == (0, "Timeout")
    for error, _ in two_writes_at_once(api):
        assert error is None, error  # answered: a silenced connection would time out
    assert Silencing.connections == 4


def test_a_silent_watch_closes_the_idle_connections(silencing: str) -> None:
    """A watch that hears nothing past its inactivity timeout: the idle connections, silenced
    by the same cause, are not used for the next write."""
    api = api_for(silencing, (0.5, 0.5))
    pool_two_connections(api)
    events = pod_watch(api)
    Silencing.silence.set()
    error, _ = within(10, lambda: list(events))
    assert isinstance(error, WatchStalled), error
    for error, _ in two_writes_at_once(api):
        assert error is None, error  # answered: a silenced connection would time out
    assert Silencing.connections == 4
