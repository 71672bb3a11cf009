"""Defences against model extraction through the prediction API, with a real Triton:
coarsened outputs and the per-client extraction signal."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from numpy.typing import NDArray

from modeldeploy_runtime.access import client_id
from modeldeploy_runtime.drift import Profile, profile_features
from triton_support import Sidecar, SidecarFactory, exchange, scrape, statuses

pytestmark = pytest.mark.triton

X = np.array([[0.1234, 0.5, 0.3, 0.04]], np.float32)  # y = 2x: 0.2468, 1.0, 0.6, 0.08
RULES = json.dumps([{"name": "y", "decimals": 1, "topK": 2}])
EXPECTED = [[0.0, 1.0, 0.6, 0.0]]  # the top two of each row, rounded to one decimal


def http_double(proxy: Sidecar, binary: bool) -> NDArray[Any]:
    client = httpclient.InferenceServerClient(proxy.http)
    x = httpclient.InferInput("x", list(X.shape), "FP32")
    x.set_data_from_numpy(X, binary_data=binary)
    out = httpclient.InferRequestedOutput("y", binary_data=binary)
    result: NDArray[Any] = client.infer("double", [x], outputs=[out]).as_numpy("y")
    return result


def grpc_double(proxy: Sidecar) -> NDArray[Any]:
    client = grpcclient.InferenceServerClient(proxy.grpc)
    x = grpcclient.InferInput("x", list(X.shape), "FP32")
    x.set_data_from_numpy(X)
    result: NDArray[Any] = client.infer("double", [x]).as_numpy("y")
    return result


@pytest.mark.parametrize("way", ["json", "binary", "grpc"])
def test_coarsened_outputs_reach_the_client_rounded_and_cut_to_the_top_k(
    sidecar: SidecarFactory, way: str
) -> None:
    proxy = sidecar(model="double", coarsen_outputs=RULES)
    got = grpc_double(proxy) if way == "grpc" else http_double(proxy, way == "binary")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, EXPECTED, atol=1e-6)
    # Without rules Triton's exact answer comes back.
    exact = http_double(sidecar(model="double"), binary=True)
    np.testing.assert_allclose(exact, X * 2, rtol=1e-6)


def test_generate_is_coarsened_and_generate_stream_refused(sidecar: SidecarFactory) -> None:
    proxy = sidecar(model="double", coarsen_outputs=RULES)
    body = json.dumps({"x": X[0].tolist()}).encode()
    head = b"POST /v2/models/double/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    answer = exchange(proxy.http, head % (b"generate", len(body)) + body)
    assert statuses(answer) == [200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["y"] == EXPECTED[0]
    refused = exchange(proxy.http, head % (b"generate_stream", len(body)) + body)
    assert statuses(refused) == [403]
    assert b"spec.monitoring.auth.outputs" in refused


def test_grpc_stream_answers_are_coarsened(sidecar: SidecarFactory) -> None:
    proxy = sidecar(model="double", coarsen_outputs=RULES)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(proxy.grpc)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    x = grpcclient.InferInput("x", list(X.shape), "FP32")
    x.set_data_from_numpy(X)
    client.async_stream_infer("double", [x])
    result, error = answers.get(timeout=20)
    client.stop_stream()
    assert error is None
    np.testing.assert_allclose(result.as_numpy("y"), EXPECTED, atol=1e-6)


def test_a_client_querying_far_from_the_training_data_stands_out(
    sidecar: SidecarFactory, tmp_path: Path
) -> None:
    """The extraction signal: each client's sampled inputs against the reference profile."""
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(20000, 4))
    (tmp_path / "profile").mkdir()
    profile = Profile(inputs={"x": profile_features("x", reference, 10)}, outputs={})
    (tmp_path / "profile" / "profile.json").write_text(json.dumps(profile.to_json()))
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "clients").write_text("honest\nprober\n")
    proxy = sidecar(
        model="features",
        reference_profile=tmp_path / "profile",
        api_keys_dir=tmp_path / "keys",
        client_salt="install-1",
        sample_rate=1.0,
    )
    client = httpclient.InferenceServerClient(proxy.http)
    for _ in range(12):
        for key, rows in (
            ("honest", rng.normal(size=(10, 4))),
            ("prober", rng.uniform(-8, 8, size=(10, 4))),  # uniform queries, as in the paper
        ):
            x = httpclient.InferInput("x", list(rows.shape), "FP32")
            x.set_data_from_numpy(rows.astype(np.float32))
            client.infer("features", [x], headers={"X-API-Key": key})
    honest, prober = client_id("honest", b"install-1"), client_id("prober", b"install-1")
    deadline = time.monotonic() + 20
    while True:
        signal = {
            dict(labels)["client"]: value
            for (name, labels), value in scrape(proxy.metrics).items()
            if name == "modeldeploy_runtime_client_input_psi"
        }
        if len(signal) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert set(signal) == {honest, prober}, signal
    assert signal[honest] < 0.25, signal
    assert signal[prober] > 1.0, signal
