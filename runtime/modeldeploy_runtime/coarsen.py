"""Coarsened outputs: the counter-measure of Tramèr et al. (2016) against model extraction.

An attacker who queries a model recovers it fastest from exact confidences; rounding them, or
returning only the top classes, costs honest clients little and the attacker many queries.
For each named output a rule rounds to ``decimals`` and/or keeps the ``topK`` largest values
of each row (the others become 0, so shapes and datatypes do not change).

Applied to what Triton answers before the client sees it: HTTP ``infer`` (JSON and the
binary tensor extension), ``generate``, and gRPC ``ModelInfer`` and ``ModelStreamInfer``.
``generate_stream`` is refused for a model with coarsened outputs (its events would have to
be held back). The drift sampler sees Triton's exact outputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from modeldeploy_runtime.drift import DTYPES, split_binary

Array = NDArray[Any]
HeaderList = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class OutputRule:
    name: str
    decimals: int | None = None
    top_k: int | None = None

    def apply(self, values: Array) -> Array:
        """The coarsened values, same shape and dtype (integers and booleans unchanged)."""
        if not np.issubdtype(values.dtype, np.floating):
            return values
        out = values.astype(np.float64)
        if self.top_k is not None and out.size:
            rows = out.reshape(-1, out.shape[-1]) if out.ndim > 1 else out.reshape(1, -1)
            if self.top_k < rows.shape[1]:
                cut = np.argpartition(-rows, self.top_k - 1, axis=1)[:, self.top_k :]
                np.put_along_axis(rows, cut, 0.0, axis=1)
            out = rows.reshape(out.shape)
        if self.decimals is not None:
            out = np.round(out, self.decimals)
        return out.astype(values.dtype)


def shaped(values: Array, shape: Sequence[int]) -> Array:
    """Flat tensor data in its declared shape (rows are what top-k works on)."""
    dims = [int(d) for d in shape]
    return values.reshape(dims) if dims and int(np.prod(dims)) == values.size else values


def parse_rules(text: str) -> tuple[OutputRule, ...]:
    """``[{"name": "probs", "decimals": 2, "topK": 3}]`` (the flag's JSON)."""
    if not text:
        return ()
    rules = []
    for item in json.loads(text):
        rules.append(OutputRule(str(item["name"]), item.get("decimals"), item.get("topK")))
    return tuple(rules)


class Coarsener:
    def __init__(self, rules: Sequence[OutputRule]) -> None:
        self.rules: Mapping[str, OutputRule] = {rule.name: rule for rule in rules}

    def __bool__(self) -> bool:
        return bool(self.rules)

    # -- HTTP -------------------------------------------------------------------------------

    def http(self, headers: HeaderList, body: bytes, action: str) -> tuple[HeaderList, bytes]:
        """A Triton answer (infer or generate) with its rules applied; its headers get the new
        lengths. An answer that is not a tensor document is returned unchanged."""
        try:
            parsed, tail = split_binary(headers, body)
        except ValueError:
            return headers, body
        document: Any = parsed
        if not isinstance(document, dict):
            return headers, body
        if action == "generate":
            for name, rule in self.rules.items():
                if name in document:
                    document[name] = rule.apply(np.asarray(document[name], np.float64)).tolist()
            return self._framed(headers, json.dumps(document).encode(), b"", binary=False)
        new_tail = bytearray()
        offset = 0
        for tensor in document.get("outputs") or []:
            matched = self.rules.get(str(tensor.get("name")))
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            dtype = DTYPES.get(str(tensor.get("datatype")))
            if size is not None:
                chunk = tail[offset : offset + int(size)]
                offset += int(size)
                if matched is not None and dtype is not None:
                    values = shaped(np.frombuffer(chunk, dtype=dtype), tensor.get("shape") or [])
                    chunk = matched.apply(values).tobytes()
                new_tail += chunk
            elif matched is not None and dtype is not None and "data" in tensor:
                values = shaped(np.asarray(tensor["data"], dtype=dtype), tensor.get("shape") or [])
                tensor["data"] = matched.apply(values).ravel().tolist()
        head = json.dumps(document, separators=(",", ":")).encode()
        return self._framed(headers, head, bytes(new_tail), binary=bool(tail))

    @staticmethod
    def _framed(
        headers: HeaderList, head: bytes, tail: bytes, *, binary: bool
    ) -> tuple[HeaderList, bytes]:
        kept = [
            (k, v)
            for k, v in headers
            if k not in (b"content-length", b"inference-header-content-length")
        ]
        if binary:
            kept.append((b"inference-header-content-length", str(len(head)).encode()))
        return kept, head + tail

    # -- gRPC -------------------------------------------------------------------------------

    def grpc(self, response: bytes, stream: bool = False) -> bytes:
        """A ModelInferResponse (or ModelStreamInferResponse) with its rules applied."""
        from tritonclient.grpc import service_pb2  # noqa: PLC0415 - only when configured

        if stream:
            message = service_pb2.ModelStreamInferResponse.FromString(response)
            if not message.HasField("infer_response"):
                return response
            self._grpc_outputs(message.infer_response)
        else:
            message = service_pb2.ModelInferResponse.FromString(response)
            self._grpc_outputs(message)
        return bytes(message.SerializeToString())

    def _grpc_outputs(self, message: Any) -> None:
        raw = message.raw_output_contents
        for index, tensor in enumerate(message.outputs):
            rule = self.rules.get(tensor.name)
            dtype = DTYPES.get(tensor.datatype)
            if rule is None or dtype is None or index >= len(raw):
                continue
            values = shaped(np.frombuffer(raw[index], dtype=dtype), tensor.shape)
            raw[index] = rule.apply(values).tobytes()
