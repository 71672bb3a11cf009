"""The sidecar's gRPC listener in front of a real Triton server."""

from __future__ import annotations

import queue
from pathlib import Path
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


def keys_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / "clients").write_text("k\n")
    return folder


def double_with(url: str, headers: dict[str, str] | None) -> str:
    """The gRPC status of one ``double`` inference ("OK" when it answered)."""
    client = grpcclient.InferenceServerClient(url)
    x = grpcclient.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 2), np.float32))
    try:
        client.infer("double", [x], headers=headers)
    except InferenceServerException as error:
        return str(error.status())
    return "OK"


def test_grpc_keys_and_rate_limits(sidecar: SidecarFactory, tmp_path: Path) -> None:
    proxy = sidecar(model="double", api_keys_dir=keys_dir(tmp_path), rate_limit_per_client="1/m")
    assert double_with(proxy.grpc, None) == "StatusCode.UNAUTHENTICATED"
    assert double_with(proxy.grpc, {"x-api-key": "wrong"}) == "StatusCode.UNAUTHENTICATED"
    # Metadata calls need the key too; health calls do not.
    client = grpcclient.InferenceServerClient(proxy.grpc)
    assert client.is_server_live()
    with pytest.raises(InferenceServerException, match="API key"):
        client.get_model_metadata("double")
    statuses = [double_with(proxy.grpc, {"authorization": "Bearer k"}) for _ in range(2)]
    assert statuses == ["OK", "StatusCode.RESOURCE_EXHAUSTED"]  # a burst of one
    samples = scrape(proxy.metrics)
    assert value(samples, "modeldeploy_runtime_rejected_requests_total", reason="unauthorized") == 3
    assert value(samples, "modeldeploy_runtime_rejected_requests_total", reason="rate_limited") == 1
    assert value(samples, "modeldeploy_runtime_requests_total", code="OK") == 1


def test_grpc_stream_messages_are_limited_and_measured_one_by_one(
    triton: Endpoint, sidecar: SidecarFactory, tmp_path: Path
) -> None:
    proxy = sidecar(model="double", api_keys_dir=keys_dir(tmp_path), rate_limit_per_client="1/m")
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(proxy.grpc)
    client.start_stream(
        callback=lambda result, error: answers.put((result, error)), headers={"x-api-key": "k"}
    )
    for _ in range(5):
        x = grpcclient.InferInput("x", [1, 2], "FP32")
        x.set_data_from_numpy(np.ones((1, 2), np.float32))
        client.async_stream_infer("double", [x])
    got = [answers.get(timeout=20) for _ in range(5)]
    client.stop_stream()
    ok = [result for result, error in got if error is None]
    refused = [error for result, error in got if error is not None]
    assert len(ok) == 1  # a burst of one
    assert (ok[0].as_numpy("y") == 2).all()
    assert len(refused) == 4
    assert all("rate limit" in str(error) for error in refused)
    samples = scrape(proxy.metrics)
    assert value(samples, "modeldeploy_runtime_requests_total", code="OK") == 1
    assert value(samples, "modeldeploy_runtime_request_duration_seconds_count", model="double") == 1
    assert value(samples, "modeldeploy_runtime_rejected_requests_total", reason="rate_limited") == 4
    assert value(samples, "modeldeploy_runtime_requests_in_flight", track="stable") == 0


def test_grpc_stream_without_a_key_is_refused(sidecar: SidecarFactory, tmp_path: Path) -> None:
    proxy = sidecar(model="double", api_keys_dir=keys_dir(tmp_path))
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(proxy.grpc)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    x = grpcclient.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 2), np.float32))
    client.async_stream_infer("double", [x])
    _, error = answers.get(timeout=20)
    client.stop_stream()
    assert error is not None
    assert "API key" in str(error)


def test_grpc_admin_calls_and_oversized_messages_are_refused(sidecar: SidecarFactory) -> None:
    proxy = sidecar(model="double", max_body_bytes=1024 * 1024)
    client = grpcclient.InferenceServerClient(proxy.grpc)
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_repository_index()
    assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
    assert "allowAdminApis" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.unregister_system_shared_memory()
    assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
    x = grpcclient.InferInput("x", [1, 512 * 1024], "FP32")  # 2 MiB
    x.set_data_from_numpy(np.ones((1, 512 * 1024), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("double", [x])
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert (double(proxy.grpc, np.ones((1, 2), np.float32)) == 2).all()
