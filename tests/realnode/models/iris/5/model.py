"""iris, version 5: a release that is fast and never fails, and is wrong: version 1's weights
with versicolor and virginica swapped, so every versicolor is called virginica and back.

Request metrics cannot tell it from a good release. The real-pod tests roll it out behind a
shadow step: stable's sidecars compare its answers with version 1's on the same requests, and
the operator rolls it back before any user sees it.
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
            probabilities = probabilities[..., [0, 2, 1]]  # the bug
            output = pb_utils.Tensor("probabilities", probabilities)
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses
