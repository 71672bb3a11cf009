"""Data drift: reference profiles, sliding-window histograms, PSI and Kolmogorov-Smirnov.

A **profile** holds, per feature, bin edges cut at the reference data's quantiles and the
reference frequency of each bin. A feature is one element of a tensor's per-row shape:
``x:0``..``x:3`` for an input ``x`` of shape ``[batch, 4]``.

The sidecar decodes a sample of requests and responses (JSON or the binary extension) off
the request path, bins every row, and keeps the last ``window`` rows' counts per feature.
At scrape time it compares them with the profile:

- PSI = sum((q - p) * ln(q / p)) over bins (p reference, q window; both smoothed), the usual
  reading being < 0.1 stable, 0.1-0.25 moderate, > 0.25 significant shift;
- KS = the largest gap between the two binned cumulative distributions;
- the drift score is the largest PSI over all inputs and outputs.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

EPSILON = 1e-4
Array = NDArray[Any]
Kind = str  # "input" or "output"

DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


class DecodeError(ValueError):
    """A sampled payload that cannot be read as tensors; counted, never raised to clients."""


# -- profiles --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureProfile:
    name: str
    edges: tuple[float, ...]  # inner edges; bins are (-inf, e0], (e0, e1], ..., (e_last, inf)
    frequencies: tuple[float, ...]  # len(edges) + 1, sums to 1

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "edges": list(self.edges), "frequencies": list(self.frequencies)}


@dataclass(frozen=True)
class Profile:
    """Per-tensor feature profiles for inputs and outputs."""

    inputs: Mapping[str, tuple[FeatureProfile, ...]]
    outputs: Mapping[str, tuple[FeatureProfile, ...]]

    def tensors(self, kind: Kind) -> Mapping[str, tuple[FeatureProfile, ...]]:
        return self.inputs if kind == "input" else self.outputs

    def to_json(self) -> dict[str, Any]:
        def dump(tensors: Mapping[str, tuple[FeatureProfile, ...]]) -> dict[str, Any]:
            return {name: [f.to_json() for f in features] for name, features in tensors.items()}

        return {"version": 1, "inputs": dump(self.inputs), "outputs": dump(self.outputs)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Profile:
        def load(tensors: Mapping[str, Any]) -> dict[str, tuple[FeatureProfile, ...]]:
            return {
                name: tuple(
                    FeatureProfile(f["name"], tuple(f["edges"]), tuple(f["frequencies"]))
                    for f in features
                )
                for name, features in tensors.items()
            }

        return cls(inputs=load(data.get("inputs", {})), outputs=load(data.get("outputs", {})))

    @classmethod
    def load(cls, path: Path) -> Profile:
        """A profile file, or the one JSON file in a mounted ConfigMap folder."""
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".json" and p.is_file())
            if not files:
                raise FileNotFoundError(f"no .json profile in {path}")
            path = files[0]
        return cls.from_json(json.loads(path.read_text()))


def feature_names(tensor: str, width: int) -> list[str]:
    return [f"{tensor}:{i}" for i in range(width)]


def profile_features(
    tensor: str, rows: Array, bins: int, names: Sequence[str] | None = None
) -> tuple[FeatureProfile, ...]:
    """Quantile bins of each column of ``rows`` (shape [n, features])."""
    data = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    names = list(names) if names is not None else feature_names(tensor, data.shape[1])
    out = []
    for column, name in zip(data.T, names, strict=True):
        edges = np.unique(np.quantile(column, np.linspace(0, 1, bins + 1)[1:-1]))
        counts = np.bincount(np.searchsorted(edges, column, side="left"), minlength=len(edges) + 1)
        out.append(
            FeatureProfile(
                name, tuple(float(e) for e in edges), tuple((counts / counts.sum()).tolist())
            )
        )
    return tuple(out)


def load_rows(path: Path) -> tuple[Array, list[str] | None]:
    """Rows of a sample file, [n, features], and the column names when the file has them."""
    if path.suffix == ".npy":
        data = np.load(path, allow_pickle=False)
        return np.asarray(data, np.float64).reshape(len(data), -1), None
    if path.suffix == ".csv":
        with path.open() as handle:
            header = handle.readline().strip().split(",")
        named = all(not _is_number(h) for h in header)
        data = np.loadtxt(path, delimiter=",", skiprows=1 if named else 0, ndmin=2)
        return data, header if named else None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415 - optional dependency

        table = pq.read_table(path)
        return np.column_stack([table.column(c).to_numpy() for c in table.column_names]), list(
            table.column_names
        )
    raise ValueError(f"{path}: expected .npy, .csv or .parquet")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# -- statistics ------------------------------------------------------------------------------


def psi(reference: Array, current: Array) -> float:
    """Population stability index of two frequency vectors (smoothed, so never infinite)."""
    p = (np.asarray(reference, np.float64) + EPSILON) / (1 + EPSILON * len(reference))
    q = (np.asarray(current, np.float64) + EPSILON) / (1 + EPSILON * len(current))
    return float(np.sum((q - p) * np.log(q / p)))


def ks(reference: Array, current: Array) -> float:
    """Kolmogorov-Smirnov distance between two binned distributions."""
    return float(np.max(np.abs(np.cumsum(reference) - np.cumsum(current))))


# -- decoding the KServe v2 payloads ----------------------------------------------------------


def split_binary(
    headers: Iterable[tuple[bytes, bytes]], body: bytes
) -> tuple[dict[str, Any], bytes]:
    """The JSON part and the binary tail of a message (the binary tensor extension)."""
    length = next((v for k, v in headers if k == b"inference-header-content-length"), None)
    try:
        if length is None:
            return json.loads(body), b""
        size = int(length)
        if size > len(body):
            raise DecodeError(f"Inference-Header-Content-Length {size} exceeds the body")
        return json.loads(body[:size]), body[size:]
    except (ValueError, UnicodeDecodeError) as error:
        raise DecodeError(f"not a KServe v2 JSON payload: {error}") from error


def decode_tensors(
    headers: Iterable[tuple[bytes, bytes]], body: bytes, key: str
) -> dict[str, Array]:
    """Numeric tensors of ``inputs`` (requests) or ``outputs`` (responses), as [rows, features]."""
    document, tail = split_binary(headers, body)
    tensors: dict[str, Array] = {}
    offset = 0
    for tensor in document.get(key, []) or []:
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        dtype = DTYPES.get(datatype or "")
        if size is not None:
            chunk, offset = tail[offset : offset + int(size)], offset + int(size)
            if len(chunk) != int(size):
                raise DecodeError(f"{name}: binary data is truncated")
            if dtype is None:
                continue  # BYTES and other non-numeric data: not profiled
            values = np.frombuffer(chunk, dtype=dtype)
        elif dtype is not None and "data" in tensor:
            values = np.asarray(tensor["data"], dtype=dtype)
        else:
            continue
        if not shape or int(np.prod(shape)) != values.size:
            raise DecodeError(f"{name}: shape {shape} does not match {values.size} values")
        rows = int(shape[0]) if len(shape) > 1 else 1
        tensors[str(name)] = values.astype(np.float64).reshape(rows, -1)
    return tensors


def decode_grpc(request: bytes, response: bytes) -> tuple[dict[str, Array], dict[str, Array]]:
    """Numeric inputs of a ModelInferRequest and outputs of its ModelInferResponse."""
    from tritonclient.grpc import service_pb2  # noqa: PLC0415 - loaded once, by the worker

    try:
        infer_request = service_pb2.ModelInferRequest.FromString(request)
        infer_response = service_pb2.ModelInferResponse.FromString(response)
    except Exception as error:  # protobuf's DecodeError and friends
        raise DecodeError(f"not a ModelInfer message: {error}") from error
    return (
        _grpc_tensors(infer_request.inputs, infer_request.raw_input_contents),
        _grpc_tensors(infer_response.outputs, infer_response.raw_output_contents),
    )


def _grpc_tensors(tensors: Any, raw: Sequence[bytes]) -> dict[str, Array]:
    out: dict[str, Array] = {}
    for index, tensor in enumerate(tensors):
        dtype = DTYPES.get(tensor.datatype)
        shape = list(tensor.shape)
        if dtype is None:
            continue
        if index < len(raw):
            values = np.frombuffer(raw[index], dtype=dtype)
        else:  # typed contents instead of raw bytes
            contents = tensor.contents
            field = next(
                (
                    f
                    for f in (
                        "fp32_contents",
                        "fp64_contents",
                        "int64_contents",
                        "int_contents",
                        "uint64_contents",
                        "uint_contents",
                        "bool_contents",
                    )
                    if len(getattr(contents, f))
                ),
                None,
            )
            if field is None:
                continue
            values = np.asarray(getattr(contents, field), dtype=dtype)
        if not shape or int(np.prod(shape)) != values.size:
            raise DecodeError(f"{tensor.name}: shape {shape} does not match {values.size} values")
        rows = int(shape[0]) if len(shape) > 1 else 1
        out[tensor.name] = values.astype(np.float64).reshape(rows, -1)
    return out


# -- the window ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureDrift:
    kind: Kind
    feature: str
    psi: float
    ks: float


class DriftWindow:
    """Per-feature bin counts of the last ``window`` rows, per tensor; thread-safe."""

    def __init__(self, profile: Profile, window: int = 2000) -> None:
        self.profile = profile
        self.window = window
        self._lock = threading.Lock()
        self._batches: dict[tuple[Kind, str], deque[tuple[int, Array]]] = {}
        self._totals: dict[tuple[Kind, str], Array] = {}
        self._rows: dict[tuple[Kind, str], int] = {}
        self._edges = {
            (kind, name): [np.asarray(f.edges) for f in features]
            for kind in ("input", "output")
            for name, features in profile.tensors(kind).items()
        }

    def add(self, kind: Kind, tensors: Mapping[str, Array]) -> None:
        for name, rows in tensors.items():
            edges = self._edges.get((kind, name))
            if edges is None or rows.shape[1] != len(edges):
                continue  # a tensor the profile does not describe
            # One row of counts per feature, padded to the widest feature's bin count.
            counts = np.zeros((len(edges), max(len(e) for e in edges) + 1), dtype=np.int64)
            for i, feature_edges in enumerate(edges):
                bins = np.searchsorted(feature_edges, rows[:, i], side="left")
                counts[i, : len(feature_edges) + 1] = np.bincount(
                    bins, minlength=len(feature_edges) + 1
                )
            self._push((kind, name), len(rows), counts)

    def _push(self, key: tuple[Kind, str], rows: int, counts: Array) -> None:
        with self._lock:
            batches = self._batches.setdefault(key, deque())
            batches.append((rows, counts))
            self._totals[key] = self._totals.get(key, np.zeros_like(counts)) + counts
            self._rows[key] = self._rows.get(key, 0) + rows
            while len(batches) > 1 and self._rows[key] - batches[0][0] >= self.window:
                old_rows, old_counts = batches.popleft()
                self._totals[key] = self._totals[key] - old_counts
                self._rows[key] -= old_rows

    def rows(self, kind: Kind) -> int:
        with self._lock:
            return max((r for (k, _), r in self._rows.items() if k == kind), default=0)

    def drift(self) -> list[FeatureDrift]:
        with self._lock:
            totals = dict(self._totals)
        out = []
        for (kind, name), counts in totals.items():
            for profile, padded in zip(self.profile.tensors(kind)[name], counts, strict=True):
                row = padded[: len(profile.frequencies)]
                current = row / max(1, row.sum())
                reference = np.asarray(profile.frequencies)
                out.append(
                    FeatureDrift(
                        kind, profile.name, psi(reference, current), ks(reference, current)
                    )
                )
        return out
