"""Coarsened outputs: rounding and top-k, on JSON, the binary extension and gRPC messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from modeldeploy_runtime.coarsen import Coarsener, OutputRule, parse_rules

PROBS = np.array([[0.61234, 0.30111, 0.08655], [0.1, 0.2, 0.7]], np.float32)


def test_rounding_and_top_k_keep_shape_and_dtype() -> None:
    rule = OutputRule("p", decimals=2, top_k=1)
    out = rule.apply(PROBS)
    assert out.dtype == np.float32
    assert out.shape == PROBS.shape
    np.testing.assert_allclose(out, [[0.61, 0, 0], [0, 0, 0.7]], atol=1e-6)
    np.testing.assert_allclose(OutputRule("p", decimals=1).apply(PROBS)[0], [0.6, 0.3, 0.1])
    assert (OutputRule("p", top_k=5).apply(PROBS) == PROBS).all()  # k beyond the width
    labels = np.array([3, 1], np.int64)
    assert (OutputRule("p", decimals=0, top_k=1).apply(labels) == labels).all()  # not floats


def test_rules_come_from_the_flags_json() -> None:
    assert parse_rules('[{"name": "p", "decimals": 2, "topK": 3}, {"name": "q", "topK": 1}]') == (
        OutputRule("p", 2, 3),
        OutputRule("q", None, 1),
    )
    assert parse_rules("") == ()
    assert not Coarsener(())


def test_json_answers_are_rewritten_and_other_outputs_kept() -> None:
    coarsener = Coarsener([OutputRule("p", decimals=1, top_k=2)])
    document = {
        "model_name": "m",
        "outputs": [
            {"name": "p", "datatype": "FP32", "shape": [2, 3], "data": PROBS.ravel().tolist()},
            {"name": "raw", "datatype": "FP32", "shape": [1], "data": [0.123456]},
        ],
    }
    headers = [(b"content-type", b"application/json"), (b"content-length", b"999")]
    new_headers, body = coarsener.http(headers, json.dumps(document).encode(), "infer")
    out = json.loads(body)
    assert out["outputs"][0]["data"] == pytest.approx([0.6, 0.3, 0, 0, 0.2, 0.7])  # per row
    assert out["outputs"][1]["data"] == pytest.approx([0.123456])
    assert (b"content-length", b"999") not in new_headers  # the proxy frames it anew


def test_binary_answers_keep_their_framing() -> None:
    coarsener = Coarsener([OutputRule("p", top_k=1)])
    raw = PROBS.tobytes()
    head = json.dumps(
        {
            "outputs": [
                {
                    "name": "p",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    headers = [(b"inference-header-content-length", str(len(head)).encode())]
    new_headers, body = coarsener.http(headers, head + raw, "infer")
    size = int(dict(new_headers)[b"inference-header-content-length"])
    assert json.loads(body[:size])["outputs"][0]["parameters"]["binary_data_size"] == len(raw)
    values = np.frombuffer(body[size:], np.float32).reshape(2, 3)
    np.testing.assert_allclose(values, [[0.61234, 0, 0], [0, 0, 0.7]], atol=1e-6)


def test_errors_and_non_tensor_answers_pass_unchanged() -> None:
    coarsener = Coarsener([OutputRule("p", decimals=1)])
    assert coarsener.http([], b"not json", "infer") == ([], b"not json")


def test_grpc_answers_are_rewritten() -> None:
    response = service_pb2.ModelInferResponse(model_name="m")
    output = response.outputs.add()
    output.name, output.datatype = "p", "FP32"
    output.shape.extend([2, 3])
    response.raw_output_contents.append(PROBS.tobytes())
    coarsener = Coarsener([OutputRule("p", decimals=1, top_k=2)])
    rewritten = service_pb2.ModelInferResponse.FromString(
        coarsener.grpc(response.SerializeToString())
    )
    values = np.frombuffer(rewritten.raw_output_contents[0], np.float32).reshape(2, 3)
    np.testing.assert_allclose(values, [[0.6, 0.3, 0], [0, 0.2, 0.7]], atol=1e-6)
    stream = service_pb2.ModelStreamInferResponse(infer_response=response)
    streamed = service_pb2.ModelStreamInferResponse.FromString(
        coarsener.grpc(stream.SerializeToString(), stream=True)
    )
    assert streamed.infer_response.raw_output_contents[0] == rewritten.raw_output_contents[0]
