"""iris, version 4: a release that cannot load (its initialize fails).

The real-pod tests deploy it and expect the ModelDeployment's status to say
ModelLoadFailed with this cause.
"""

from __future__ import annotations

from typing import Any


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config: Any) -> Any:
        config.add_input({"name": "features", "data_type": "TYPE_FP32", "dims": [4]})
        config.add_output({"name": "probabilities", "data_type": "TYPE_FP32", "dims": [3]})
        return config

    def initialize(self, args: dict[str, Any]) -> None:
        raise RuntimeError("weights.npz not found next to model.py")
