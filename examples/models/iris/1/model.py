"""iris, version 1: a softmax classifier of iris flowers, served by Triton's Python backend.

Input ``features``: FP32 [4] (sepal length and width, petal length and width, in cm).
Output ``probabilities``: FP32 [3] (setosa, versicolor, virginica).
A linear discriminant: the class means of Fisher's iris data (nearest mean, temperature 1/2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

WEIGHTS = np.array(
    [
        [10.01, 11.87, 13.18],
        [6.86, 5.54, 5.95],
        [2.92, 8.52, 11.10],
        [0.49, 2.65, 4.05],
    ],
    dtype=np.float32,
)
BIAS = np.array([-39.0, -62.8, -87.2], dtype=np.float32)


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config: Any) -> Any:
        config.add_input({"name": "features", "data_type": "TYPE_FP32", "dims": [4]})
        config.add_output({"name": "probabilities", "data_type": "TYPE_FP32", "dims": [3]})
        config.set_max_batch_size(64)
        return config

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            features = pb_utils.get_input_tensor_by_name(request, "features").as_numpy()
            logits = features.astype(np.float32) @ WEIGHTS + BIAS
            exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
            probabilities = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
            output = pb_utils.Tensor("probabilities", probabilities)
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses
