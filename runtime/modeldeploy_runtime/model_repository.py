"""Triton's model repository layout and config.pbtxt: pure functions.

<repository>/<model name>/config.pbtxt
<repository>/<model name>/<version>/<model file or folder>
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# format -> (config.pbtxt backend/platform line, the file or folder name Triton looks for)
FORMATS: dict[str, tuple[str, str]] = {
    "onnx": ('backend: "onnxruntime"', "model.onnx"),
    "tensorrt_plan": ('platform: "tensorrt_plan"', "model.plan"),
    "pytorch_libtorch": ('backend: "pytorch"', "model.pt"),
    "tensorflow_savedmodel": ('platform: "tensorflow_savedmodel"', "model.savedmodel"),
    "python": ('backend: "python"', "model.py"),
}


def model_dir(repository: Path, name: str) -> Path:
    return repository / name


def version_dir(repository: Path, name: str, version: str) -> Path:
    return repository / name / version


def default_file_name(model_format: str) -> str:
    return FORMATS[model_format][1]


def render_config(name: str, model_format: str, version: str, overrides: Mapping[str, Any]) -> str:
    """config.pbtxt for one model version, with the spec's overrides.

    Inputs and outputs are left to Triton's auto-complete (on by default for ONNX, TensorRT and
    TensorFlow); ``version_policy`` pins the one version the operator deployed.
    """
    backend = FORMATS[model_format][0]
    lines = [
        f'name: "{name}"',
        backend,
        f"version_policy: {{ specific: {{ versions: [{int(version)}] }} }}",
    ]
    if "maxBatchSize" in overrides:
        lines.append(f"max_batch_size: {int(overrides['maxBatchSize'])}")
    batching = overrides.get("dynamicBatching")
    if batching is not None:
        parts = []
        sizes = batching.get("preferredBatchSizes") or []
        if sizes:
            parts.append(f"preferred_batch_size: [{', '.join(str(int(s)) for s in sizes)}]")
        delay = batching.get("maxQueueDelayMicroseconds")
        if delay is not None:
            parts.append(f"max_queue_delay_microseconds: {int(delay)}")
        lines.append("dynamic_batching { " + " ".join(parts) + " }")
    if "instanceCount" in overrides:
        lines.append(
            f"instance_group [{{ count: {int(overrides['instanceCount'])}, kind: KIND_AUTO }}]"
        )
    return "\n".join(lines) + "\n"
