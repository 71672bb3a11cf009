"""The sidecar's HTTP proxy in front of a real Triton server."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from localcluster.operator import free_port
from support import wait_for
from triton_support import Endpoint, SidecarFactory, scrape, value

pytestmark = pytest.mark.triton

Array = NDArray[Any]


def infer_double(url: str, values: Array, binary: bool) -> Array:
    client = httpclient.InferenceServerClient(url)
    x = httpclient.InferInput("x", list(values.shape), "FP32")
    x.set_data_from_numpy(values, binary_data=binary)
    out = httpclient.InferRequestedOutput("y", binary_data=binary)
    result = client.infer("double", [x], outputs=[out])
    array: Array = result.as_numpy("y")
    return array


def infer_echo(url: str, ids: Array, text: Array, binary: bool) -> tuple[Any, Any]:
    client = httpclient.InferenceServerClient(url)
    a = httpclient.InferInput("ids", list(ids.shape), "INT64")
    a.set_data_from_numpy(ids, binary_data=binary)
    b = httpclient.InferInput("text", list(text.shape), "BYTES")
    b.set_data_from_numpy(text, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("ids_out", "text_out")
    ]
    result = client.infer("echo", [a, b], outputs=outputs)
    return result.as_numpy("ids_out"), result.as_numpy("text_out")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_outputs_are_identical_through_the_sidecar(
    triton: Endpoint, sidecar: SidecarFactory, binary: bool
) -> None:
    proxy = sidecar(model="double")
    values = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    direct = infer_double(triton.http, values, binary)
    proxied = infer_double(proxy.http, values, binary)
    assert proxied.dtype == np.float32
    np.testing.assert_array_equal(proxied, direct)
    np.testing.assert_array_equal(proxied, values * 2)

    ids = np.array([[1, 2**40, -3]], dtype=np.int64)
    text = np.array([[b"h\xc3\xa9llo \x00 bytes"]], dtype=np.object_)
    direct_ids, direct_text = infer_echo(triton.http, ids, text, binary)
    proxied_ids, proxied_text = infer_echo(proxy.http, ids, text, binary)
    np.testing.assert_array_equal(proxied_ids, direct_ids)
    np.testing.assert_array_equal(proxied_ids, ids + 1)
    assert proxied_text.tolist() == direct_text.tolist()


def triton_error(url: str, call: str) -> tuple[str | None, str]:
    client = httpclient.InferenceServerClient(url)
    x = httpclient.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.ones((1, 3), dtype=np.float32))
    model, inputs = "no-such-model", [x]
    if call == "bad-shape":  # a shape the model does not accept
        bad = httpclient.InferInput("x", [1, 2, 3], "FP32")
        bad.set_data_from_numpy(np.ones((1, 2, 3), dtype=np.float32))
        model, inputs = "double", [bad]
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, inputs)
    return caught.value.status(), caught.value.message()


@pytest.mark.parametrize("call", ["unknown-model", "bad-shape"])
def test_triton_errors_pass_through_unchanged(
    triton: Endpoint, sidecar: SidecarFactory, call: str
) -> None:
    proxy = sidecar(model="double")
    assert triton_error(proxy.http, call) == triton_error(triton.http, call)


def test_histogram_counts_every_request_with_bounded_labels(
    triton: Endpoint, sidecar: SidecarFactory
) -> None:
    proxy = sidecar(model="double", model_version="1", track="canary")
    n = 37
    for i in range(n):
        infer_double(proxy.http, np.full((1, 4), i, dtype=np.float32), binary=i % 2 == 0)
    triton_error(proxy.http, "unknown-model")
    samples = scrape(proxy.metrics)
    labels = {"model": "double", "version": "1", "track": "canary"}
    assert value(samples, "modeldeploy_runtime_request_duration_seconds_count", **labels) == n
    assert (
        value(samples, "modeldeploy_runtime_request_duration_seconds_bucket", le="10.0", **labels)
        == n
    )
    assert (
        value(samples, "modeldeploy_runtime_request_duration_seconds_bucket", le="0.0005", **labels)
        < n
    )
    assert value(samples, "modeldeploy_runtime_requests_total", code="200", **labels) == n
    # An unknown model is counted under a bounded label, not its own name.
    assert value(samples, "modeldeploy_runtime_requests_total", model="other") == 1
    assert value(samples, "modeldeploy_runtime_request_bytes_count", **labels) == n
    assert value(samples, "modeldeploy_runtime_requests_in_flight", track="canary") == 0
    assert not any("no-such-model" in str(ls) for _, ls in samples)


def raw(proxy: str, data: bytes, read_timeout: float = 10.0) -> tuple[int, bytes]:
    host, port = proxy.split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < _length(
            received
        ):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    status = int(received.split(b" ", 2)[1])
    return status, received.split(b"\r\n\r\n", 1)[1]


def _length(received: bytes) -> int:
    for line in received.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def post(path: str, body: bytes, *headers: str, length: int | None = None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: test",
        f"Content-Length: {len(body) if length is None else length}",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


INFER = "/v2/models/double/infer"
BINARY_HEADER = (
    b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32",'
    b'"parameters":{"binary_data_size":16}}]}'
)


@pytest.mark.parametrize(
    "request_bytes",
    [
        post(INFER, b'{"inputs": [ {'),
        # The JSON header announces 16 bytes of tensor data; 8 follow.
        post(
            INFER,
            BINARY_HEADER + b"\x00" * 8,
            f"Inference-Header-Content-Length: {len(BINARY_HEADER)}",
        ),
    ],
    ids=["malformed-json", "truncated-binary-tensor"],
)
def test_bad_payloads_get_tritons_own_error_and_are_counted(
    triton: Endpoint, sidecar: SidecarFactory, request_bytes: bytes
) -> None:
    proxy = sidecar(model="double")
    direct = raw(triton.http, request_bytes)
    proxied = raw(proxy.http, request_bytes)
    assert proxied == direct
    assert direct[0] >= 400
    assert b"error" in direct[1]
    assert (
        value(scrape(proxy.metrics), "modeldeploy_runtime_requests_total", code=str(direct[0])) == 1
    )


@pytest.mark.parametrize(
    ("request_bytes", "status", "message", "reason"),
    [
        (post(INFER, b"x" * 5000), 413, "exceeds the limit", "too_large"),
        (
            post(INFER, b"<xml/>", "Content-Type: text/xml"),
            415,
            "unsupported content type",
            "content_type",
        ),
        (post(INFER, b"{}", length=100), 408, "not received within", "client_timeout"),
        (b"GARBAGE\r\n\r\n", 400, "malformed HTTP/1.1", "bad_http"),
    ],
    ids=["over-size-limit", "unknown-content-type", "body-shorter-than-announced", "not-http"],
)
def test_requests_the_sidecar_refuses_get_a_clear_error_and_a_counter(
    triton: Endpoint,
    sidecar: SidecarFactory,
    request_bytes: bytes,
    status: int,
    message: str,
    reason: str,
) -> None:
    proxy = sidecar(model="double", max_body_bytes=4096, client_timeout_seconds=1)
    got_status, body = raw(proxy.http, request_bytes)
    assert got_status == status, body
    assert body.startswith(b'{"error": ')
    assert message.encode() in body
    assert (
        value(scrape(proxy.metrics), "modeldeploy_runtime_rejected_requests_total", reason=reason)
        == 1
    )
    # The sidecar is still serving.
    np.testing.assert_array_equal(
        infer_double(proxy.http, np.ones((1, 2), np.float32), False), [[2, 2]]
    )


def test_triton_down_is_a_502_and_counted(sidecar: SidecarFactory) -> None:
    proxy = sidecar(upstream=f"127.0.0.1:{free_port()}", model="double")
    status, body = raw(proxy.http, post(INFER, b"{}"))
    assert status == 502
    assert b"cannot reach Triton" in body
    assert (
        value(scrape(proxy.metrics), "modeldeploy_runtime_upstream_errors_total", reason="connect")
        == 1
    )
    with urllib.request.urlopen(f"http://{proxy.metrics}/healthz", timeout=5) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://{proxy.metrics}/readyz", timeout=5)
    assert caught.value.code == 503


def test_slow_triton_is_a_504_after_the_configured_timeout(
    triton: Endpoint, sidecar: SidecarFactory
) -> None:
    direct = httpclient.InferenceServerClient(triton.http)
    finished = direct.get_inference_statistics("slow")["model_stats"][0]["inference_count"]
    proxy = sidecar(model="slow", upstream_timeout_seconds=0.5)
    client = httpclient.InferenceServerClient(proxy.http, network_timeout=30)
    x = httpclient.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 2), np.float32))
    delay = httpclient.InferInput("delay", [1, 1], "FP32")
    delay.set_data_from_numpy(np.array([[2.0]], np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("slow", [x, delay])
    assert caught.value.status() == "504"
    assert "did not answer within 0.5s" in caught.value.message()
    assert (
        value(scrape(proxy.metrics), "modeldeploy_runtime_upstream_errors_total", reason="timeout")
        == 1
    )
    # Triton still runs the abandoned 2 s inference: wait for it, so it does not land in the
    # statistics window of the next test (it once made a 50 ms model look like 1 s).
    wait_for(
        "the abandoned inference",
        lambda: (
            direct.get_inference_statistics("slow")["model_stats"][0]["inference_count"] > finished
        ),
        timeout=10,
    )


def test_readyz_follows_the_model(triton: Endpoint, sidecar: SidecarFactory) -> None:
    with urllib.request.urlopen(
        f"http://{sidecar(model='double').metrics}/readyz", timeout=5
    ) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://{sidecar(model='absent').metrics}/readyz", timeout=5)
    assert caught.value.code == 503


def test_triton_queue_and_compute_time_from_its_statistics(sidecar: SidecarFactory) -> None:
    proxy = sidecar(model="slow", stats_interval_seconds=0.2)
    client = httpclient.InferenceServerClient(proxy.http)
    slowest = 0.0
    for _ in range(5):
        x = httpclient.InferInput("x", [1, 2], "FP32")
        x.set_data_from_numpy(np.ones((1, 2), np.float32))
        delay = httpclient.InferInput("delay", [1, 1], "FP32")
        delay.set_data_from_numpy(np.array([[0.05]], np.float32))
        started = time.monotonic()
        client.infer("slow", [x, delay])
        slowest = max(slowest, time.monotonic() - started)
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(proxy.metrics)
        compute = value(samples, "modeldeploy_runtime_triton_compute_seconds", model="slow")
        if compute or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # The model sleeps 50 ms per request; Triton's server-side mean can never exceed what the
    # slowest request took end to end.
    assert 0.04 < compute <= slowest
    assert value(samples, "modeldeploy_runtime_triton_queue_seconds", model="slow") >= 0
