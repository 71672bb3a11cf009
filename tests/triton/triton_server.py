"""A real Triton Inference Server (nvidia-pytriton's build, on CPU) with test models.

Run as a process by the `triton` fixture: ``python triton_server.py HTTP GRPC METRICS``.

- ``double``: FP32 [-1] -> y = 2x
- ``echo``: INT64 ids and BYTES text -> ids + 1, text unchanged
- ``slow``: FP32 [-1] -> y = x, after sleeping ``delay`` seconds (an FP32 [1] input)
- ``features``: FP32 [4] -> FP32 [1] score = sum(x); the drift tests' model
- ``features_2ms``: the same after 2 ms of "compute" (the benchmark's slower model)
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

Array = NDArray[Any]


@batch
def double(x: Array) -> dict[str, Array]:
    return {"y": x * 2}


@batch
def echo(ids: Array, text: Array) -> dict[str, Array]:
    return {"ids_out": ids + 1, "text_out": text}


@batch
def slow(x: Array, delay: Array) -> dict[str, Array]:
    time.sleep(float(delay.max()))
    return {"y": x}


@batch
def features(x: Array) -> dict[str, Array]:
    return {"score": x.sum(axis=1, keepdims=True).astype(np.float32)}


@batch
def features_2ms(x: Array) -> dict[str, Array]:
    time.sleep(0.002)
    return {"score": x.sum(axis=1, keepdims=True).astype(np.float32)}


def main(http_port: int, grpc_port: int, metrics_port: int) -> None:
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=http_port,
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        allow_metrics=True,
    )
    batching = ModelConfig(max_batch_size=64)
    models: list[tuple[str, Any, list[Tensor], list[Tensor]]] = [
        (
            "double",
            double,
            [Tensor(name="x", dtype=np.float32, shape=(-1,))],
            [Tensor(name="y", dtype=np.float32, shape=(-1,))],
        ),
        (
            "echo",
            echo,
            [
                Tensor(name="ids", dtype=np.int64, shape=(-1,)),
                Tensor(name="text", dtype=bytes, shape=(1,)),
            ],
            [
                Tensor(name="ids_out", dtype=np.int64, shape=(-1,)),
                Tensor(name="text_out", dtype=bytes, shape=(1,)),
            ],
        ),
        (
            "slow",
            slow,
            [
                Tensor(name="x", dtype=np.float32, shape=(-1,)),
                Tensor(name="delay", dtype=np.float32, shape=(1,)),
            ],
            [Tensor(name="y", dtype=np.float32, shape=(-1,))],
        ),
        (
            "features",
            features,
            [Tensor(name="x", dtype=np.float32, shape=(4,))],
            [Tensor(name="score", dtype=np.float32, shape=(1,))],
        ),
        (
            "features_2ms",
            features_2ms,
            [Tensor(name="x", dtype=np.float32, shape=(4,))],
            [Tensor(name="score", dtype=np.float32, shape=(1,))],
        ),
    ]
    # Statistics stay open: the sidecar reads them, as it does from a stock tritonserver.
    security = TritonSecurityConfig(
        restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"]
    )
    with Triton(config=config, security_config=security) as triton:
        for name, func, inputs, outputs in models:
            triton.bind(
                model_name=name, infer_func=func, inputs=inputs, outputs=outputs, config=batching
            )
        triton.serve()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
