"""The sidecar as the prediction API's only door, against a real Triton behind it.

Smuggling is checked where it would land: Triton's own inference statistics say how many
inferences ran, whatever the sidecar answered.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from triton_support import Endpoint, Sidecar, SidecarFactory, exchange, scrape, statuses, value

pytestmark = pytest.mark.triton

DOUBLE = b'{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}'
SMUGGLED = (
    b"POST /v2/models/double/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(DOUBLE)
    + DOUBLE
)
HEAD = b"POST /v2/models/double/infer HTTP/1.1\r\nHost: x\r\n"


def inferences(triton: Endpoint) -> int:
    """How many inference requests Triton itself has run for ``double`` (success or not)."""
    url = f"http://{triton.http}/v2/models/double/stats"
    with urllib.request.urlopen(url, timeout=5) as response:
        stats = json.load(response)["model_stats"][0]["inference_stats"]
    return int(stats["success"]["count"]) + int(stats["fail"]["count"])


# Each sends one ambiguously framed request whose body holds a whole second inference. A
# parser that guessed would forward that second inference to Triton.
SMUGGLING = {
    "cl-cl": HEAD + b"Content-Length: 0\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
    "cl-te": HEAD
    + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % (len(SMUGGLED) + 5)
    + SMUGGLED,
    "te-cl": HEAD
    + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n%x\r\n" % len(SMUGGLED)
    + SMUGGLED
    + b"\r\n0\r\n\r\n",
    "te-te-space": HEAD
    + b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "te-te-two": HEAD
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n"
    + SMUGGLED,
    "te-te-list": HEAD + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-obs-fold": HEAD + b"X-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "bare-lf": HEAD.replace(b"\r\n", b"\n")
    + b"Content-Length: 0\n\n"
    + SMUGGLED.replace(b"\r\n", b"\n"),
    "chunk-0x": HEAD + b"Transfer-Encoding: chunked\r\n\r\n0x0\r\n\r\n" + SMUGGLED,
    "chunk-negative": HEAD + b"Transfer-Encoding: chunked\r\n\r\n-0\r\n\r\n" + SMUGGLED,
    "http10-te": b"POST /v2/models/double/infer HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_smuggling_never_reaches_triton_as_a_second_request(
    triton: Endpoint, sidecar: SidecarFactory, name: str
) -> None:
    proxy = sidecar(model="double")
    before = inferences(triton)
    received = exchange(proxy.http, SMUGGLING[name])
    codes = statuses(received)
    assert codes, received[:300]
    assert 400 <= codes[0] < 600, received[:300]
    assert 200 not in codes, received[:300]
    assert inferences(triton) == before
    rejected = scrape(proxy.metrics)
    assert (
        sum(
            v
            for (n, _), v in rejected.items()
            if n == "modeldeploy_runtime_rejected_requests_total"
        )
        == 1
    )


def test_the_inference_count_sees_what_a_well_framed_pipeline_sends(
    triton: Endpoint, sidecar: SidecarFactory
) -> None:
    """The control for the test above: two honest pipelined inferences are two."""
    proxy = sidecar(model="double")
    before = inferences(triton)
    received = exchange(proxy.http, SMUGGLED + SMUGGLED)
    assert statuses(received) == [200, 200]
    assert inferences(triton) == before + 2


def test_expect_100_continue_gets_its_interim_and_its_answer(sidecar: SidecarFactory) -> None:
    proxy = sidecar(model="double")
    host, port = proxy.http.split(":")
    head = HEAD + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(DOUBLE)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(DOUBLE)
        answer = b""
        while b'"data":[2.0,4.0]' not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    samples = scrape(proxy.metrics)
    assert value(samples, "modeldeploy_runtime_requests_total", code="200") == 1
    assert value(samples, "modeldeploy_runtime_requests_total", code="100") == 0


@pytest.mark.parametrize(
    "target",
    [
        "/v2/models/double/infer",
        "/v2/models/double/generate",
        "/v2/models/double/generate_stream",
        "http://elsewhere/v2/models/double/infer",  # absolute form
        "/v2/models/double/versions/1/infer",
    ],
)
def test_every_inference_path_is_keyed_limited_and_measured(
    sidecar: SidecarFactory, tmp_path: Path, target: str
) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "clients").write_text("k\n")
    proxy = sidecar(model="double", api_keys_dir=tmp_path / "keys", rate_limit_per_client="1/m")
    body = DOUBLE if target.endswith("infer") else b'{"x": [1.0, 2.0]}'
    request = (
        b"POST " + target.encode() + b" HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n"
        b"Content-Length: %d\r\n\r\n"
    )
    assert statuses(exchange(proxy.http, request % (b"wrong", len(body)) + body)) == [401]
    first = exchange(proxy.http, request % (b"k", len(body)) + body)
    assert statuses(first) == [200], first
    assert b"4.0" in first
    for _ in range(2):
        assert statuses(exchange(proxy.http, request % (b"k", len(body)) + body)) == [429]
    samples = scrape(proxy.metrics)
    assert value(samples, "modeldeploy_runtime_requests_total", code="200") == 1
    assert (
        sum(
            v
            for (n, labels), v in samples.items()
            if n == "modeldeploy_runtime_request_duration_seconds_count"
        )
        == 1
    )
    assert value(samples, "modeldeploy_runtime_rejected_requests_total", reason="rate_limited") == 2


def test_generate_stream_is_relayed_as_a_stream(sidecar: SidecarFactory) -> None:
    proxy = sidecar(model="double")
    body = b'{"x": [1.0, 2.0]}'
    received = exchange(
        proxy.http,
        b"POST /v2/models/double/generate_stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body,
    )
    head, _, chunked = received.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    assert b"text/event-stream" in head
    assert b'data: {"model_name":"double","model_version":"1","y":[2.0,4.0]}' in chunked
    assert chunked.endswith(b"0\r\n\r\n")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v2/repository/index", 403),
        ("POST", "/v2/repository/models/double/unload", 403),
        ("GET", "/v2/trace/setting", 403),
        ("POST", "/v2/logging", 403),
        ("GET", "/v2/systemsharedmemory/status", 403),
        ("GET", "/v2/models/double/trace/setting", 403),
        ("GET", "/metrics", 404),
        ("GET", "/v2/models/double/infer", 405),
        ("DELETE", "/v2/models/double", 405),
    ],
)
def test_admin_and_unknown_apis_are_refused_by_the_door(
    triton: Endpoint, sidecar: SidecarFactory, method: str, path: str, status: int
) -> None:
    proxy = sidecar(model="double")
    request = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
    received = exchange(proxy.http, request)
    assert statuses(received) == [status], received
    assert b'{"error": ' in received


def test_admin_apis_pass_when_the_model_allows_them(sidecar: SidecarFactory) -> None:
    proxy = sidecar(model="double", allow_admin_apis="true")
    received = exchange(
        proxy.http, b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    # Triton answers itself: the test server restricts this API behind its own token.
    assert b"triton-access-token" in received, received


def rss_mib(proxy: Sidecar) -> float:
    for line in Path(f"/proc/{proxy.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def infer_ok(proxy: Sidecar, key: str | None = None) -> bool:
    client = httpclient.InferenceServerClient(proxy.http, network_timeout=10)
    x = httpclient.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 2), np.float32))
    result = client.infer("double", [x], headers={"X-API-Key": key} if key else None)
    return bool((result.as_numpy("y") == 2).all())


def test_overload_leaves_the_sidecar_answering_with_bounded_memory(
    sidecar: SidecarFactory, tmp_path: Path
) -> None:
    """1,000 idle connections, a slowloris, a 1 GiB body without a key, and more big bodies
    at once than the buffer budget holds: other clients are answered, RSS stays < 256 MiB."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "clients").write_text("k\n")
    proxy = sidecar(
        model="double",
        api_keys_dir=tmp_path / "keys",
        header_timeout_seconds=3,
        max_body_bytes=32 * 1024 * 1024,
        max_buffered_bytes=64 * 1024 * 1024,
    )
    host, port = proxy.http.split(":")
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(1000)]
    try:
        assert infer_ok(proxy, "k")
        # Slowloris: a head that never ends, one byte at a time; closed by the head timeout.
        slow = socket.create_connection((host, int(port)), timeout=10)
        slow.sendall(b"POST /v2/models/double/infer HTTP/1.1\r\nHost: x\r\n")
        for _ in range(20):
            try:
                slow.sendall(b"X")
            except OSError:
                break  # the sidecar closed it
            time.sleep(0.5)
        closed_by_server = slow.recv(4096)
        slow.close()
        # The head timeout closed it (not the loop's end): its own 408 and message.
        assert b"408" in closed_by_server.split(b"\r\n", 1)[0], closed_by_server
        assert b"request head not received within 3s" in closed_by_server
        assert (
            value(
                scrape(proxy.metrics),
                "modeldeploy_runtime_rejected_requests_total",
                reason="header_timeout",
            )
            == 1
        )
        # 1 GiB announced without a key: refused from the head, the body is never read.
        big = socket.create_connection((host, int(port)), timeout=10)
        big.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % (1 << 30) + b"\0" * (1 << 20))
        answer = big.recv(4096)
        big.close()
        assert answer.startswith(b"HTTP/1.1 401"), answer
        # Three 30 MiB bodies at once with a 64 MiB budget: one is shed with 503.
        body = b"\0" * (30 * 1024 * 1024)
        results: list[bytes] = []

        def send_big() -> None:
            results.append(
                exchange(
                    proxy.http,
                    HEAD + b"X-API-Key: k\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
                    30,
                )
            )

        threads = [threading.Thread(target=send_big) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        codes = [statuses(r)[0] for r in results]
        assert 503 in codes, codes  # the others reach Triton (which rejects zeros as JSON)
        assert infer_ok(proxy, "k")
        assert rss_mib(proxy) < 256, rss_mib(proxy)
    finally:
        for sock in idle:
            sock.close()
