"""The sidecar's gRPC listener in front of a real Triton server."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from modeldeploy_runtime.grpc_proxy import model_and_version
from triton_support import Endpoint, SidecarFactory, scrape, value

pytestmark = pytest.mark.triton


def echo(url: str, ids: NDArray[Any], text: NDArray[Any]) -> tuple[Any, Any]:
    client = grpcclient.InferenceServerClient(url)
    a = grpcclient.InferInput("ids", list(ids.shape), "INT64")
    a.set_data_from_numpy(ids)
    b = grpcclient.InferInput("text", list(text.shape), "BYTES")
    b.set_data_from_numpy(text)
    result = client.infer("echo", [a, b])
    return result.as_numpy("ids_out"), result.as_numpy("text_out")


def double(url: str, values: NDArray[Any]) -> NDArray[Any]:
    client = grpcclient.InferenceServerClient(url)
    x = grpcclient.InferInput("x", list(values.shape), "FP32")
    x.set_data_from_numpy(values)
    out: NDArray[Any] = client.infer("double", [x], model_version="1").as_numpy("y")
    return out


def test_grpc_outputs_are_identical_through_the_sidecar(
    triton: Endpoint, sidecar: SidecarFactory
) -> None:
    proxy = sidecar(model="double")
    values = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(double(proxy.grpc, values), double(triton.grpc, values))
    ids = np.array([[7, -(2**41)]], dtype=np.int64)
    text = np.array([[b"\x00\xffraw"]], dtype=np.object_)
    direct, proxied = echo(triton.grpc, ids, text), echo(proxy.grpc, ids, text)
    np.testing.assert_array_equal(proxied[0], direct[0])
    assert proxied[1].tolist() == direct[1].tolist()
    client = grpcclient.InferenceServerClient(proxy.grpc)
    assert client.is_server_ready()
    assert client.get_model_metadata("double").name == "double"


def grpc_error(url: str) -> tuple[str | None, str]:
    client = grpcclient.InferenceServerClient(url)
    x = grpcclient.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 2), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("no-such-model", [x])
    return caught.value.status(), caught.value.message()


def test_grpc_errors_pass_through(triton: Endpoint, sidecar: SidecarFactory) -> None:
    assert grpc_error(sidecar(model="double").grpc) == grpc_error(triton.grpc)


def test_grpc_requests_are_measured(sidecar: SidecarFactory) -> None:
    proxy = sidecar(model="double", model_version="1")
    for _ in range(9):
        double(proxy.grpc, np.ones((1, 3), np.float32))
    samples = scrape(proxy.metrics)
    labels = {"model": "double", "version": "1", "track": "stable"}
    assert value(samples, "modeldeploy_runtime_request_duration_seconds_count", **labels) == 9


def test_model_and_version_are_read_from_the_wire() -> None:
    message = service_pb2.ModelInferRequest(model_name="bert", model_version="12", id="x")
    message.raw_input_contents.append(b"\x00" * 1000)
    assert model_and_version(message.SerializeToString()) == ("bert", "12")
    assert model_and_version(b"\x0a\x05ab") == ("ab", "")  # truncated: what could be read
    assert model_and_version(b"") == ("", "")
