"""iris, version 3: a bad release. It loads and becomes Ready, then fails every inference.

The real-pod tests roll it out as a canary: the sidecar counts its errors, the analysis
sees them in Prometheus, and the operator rolls it back.
"""

from __future__ import annotations

from typing import Any

import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config: Any) -> Any:
        config.add_input({"name": "features", "data_type": "TYPE_FP32", "dims": [4]})
        config.add_output({"name": "probabilities", "data_type": "TYPE_FP32", "dims": [3]})
        config.set_max_batch_size(64)
        return config

    def execute(self, requests: list[Any]) -> list[Any]:
        error = pb_utils.TritonError("feature scaler missing: this release is broken")
        return [pb_utils.InferenceResponse(error=error) for _ in requests]
