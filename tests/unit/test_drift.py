"""Drift maths and payload decoding, no server."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modeldeploy_runtime.__main__ import main as runtime_main
from modeldeploy_runtime.drift import (
    DecodeError,
    DriftWindow,
    Profile,
    decode_tensors,
    ks,
    profile_features,
    psi,
)
from modeldeploy_runtime.drift_monitor import DriftMonitor
from modeldeploy_runtime.proxy import InferExchange

RNG = np.random.default_rng(7)


def reference_profile(rows: int = 20000) -> Profile:
    data = RNG.normal(size=(rows, 3))
    return Profile(inputs={"x": profile_features("x", data, 10)}, outputs={})


def test_psi_and_ks_of_identical_and_shifted_distributions() -> None:
    p = np.full(10, 0.1)
    assert psi(p, p) == pytest.approx(0.0)
    assert ks(p, p) == 0.0
    shifted = np.array([0.0, 0, 0, 0, 0.1, 0.1, 0.2, 0.2, 0.2, 0.2])
    assert psi(p, shifted) > 0.25
    assert ks(p, shifted) == pytest.approx(0.4)
    assert np.isfinite(psi(p, np.eye(10)[0]))  # empty bins are smoothed, never infinite


def test_quantile_bins_are_even_on_the_reference() -> None:
    [feature, *_] = reference_profile().inputs["x"]
    assert len(feature.edges) == 9
    assert sum(feature.frequencies) == pytest.approx(1.0)
    assert max(feature.frequencies) - min(feature.frequencies) < 0.02


def test_window_flags_only_the_shifted_feature_and_forgets_old_rows() -> None:
    window = DriftWindow(reference_profile(), window=2000)
    window.add("input", {"x": RNG.normal(size=(2000, 3))})
    assert all(d.psi < 0.1 for d in window.drift())
    shifted = RNG.normal(size=(2000, 3))
    shifted[:, 1] += 2.0
    for chunk in np.array_split(shifted, 20):
        window.add("input", {"x": chunk})
    by_feature = {d.feature: d for d in window.drift()}
    assert by_feature["x:1"].psi > 0.25
    assert by_feature["x:1"].ks > 0.5
    assert by_feature["x:0"].psi < 0.1
    assert by_feature["x:2"].psi < 0.1
    assert window.rows("input") == 2000  # the reference-like rows were evicted


def test_tensors_the_profile_does_not_know_are_ignored() -> None:
    window = DriftWindow(reference_profile())
    window.add("input", {"other": np.ones((5, 3)), "x": np.ones((5, 7))})
    assert window.drift() == []


def test_decode_json_and_binary_payloads() -> None:
    values = np.arange(8, dtype=np.float32).reshape(2, 4)
    body = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": values.ravel().tolist()}
            ]
        }
    ).encode()
    np.testing.assert_array_equal(decode_tensors([], body, "inputs")["x"], values)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 32},
                },
                {
                    "name": "t",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 7},
                },
                {
                    "name": "i",
                    "shape": [1, 2],
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": 16},
                },
            ]
        }
    ).encode()
    tail = values.tobytes() + b"\x03\x00\x00\x00abc" + np.array([5, -6], np.int64).tobytes()
    headers = [(b"inference-header-content-length", str(len(header)).encode())]
    decoded = decode_tensors(headers, header + tail, "inputs")
    np.testing.assert_array_equal(decoded["x"], values)
    np.testing.assert_array_equal(decoded["i"], [[5, -6]])
    assert "t" not in decoded  # BYTES are not profiled


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ([], b"{not json"),
        ([(b"inference-header-content-length", b"80")], b'{"inputs": []}'),
        (
            [(b"inference-header-content-length", b"79")],
            b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":16}}]}'[
                :79
            ]
            + b"\x00" * 4,
        ),
        ([], b'{"inputs":[{"name":"x","shape":[3,4],"datatype":"FP32","data":[1,2]}]}'),
    ],
    ids=["malformed-json", "header-longer-than-body", "truncated-binary", "shape-mismatch"],
)
def test_undecodable_payloads_raise_decode_error(
    headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    with pytest.raises(DecodeError):
        decode_tensors(headers, body, "inputs")


def test_profile_command_from_csv_and_npy(tmp_path: Path) -> None:
    rows = RNG.normal(size=(500, 2))
    csv = tmp_path / "train.csv"
    csv.write_text("age,income\n" + "\n".join(f"{a},{b}" for a, b in rows))
    np.save(tmp_path / "scores.npy", rows.sum(axis=1, keepdims=True))
    out = tmp_path / "profile.json"
    code = runtime_main(
        [
            "profile",
            f"--inputs={csv}",
            "--input-tensor=x",
            f"--outputs={tmp_path / 'scores.npy'}",
            "--output-tensor=score",
            f"--out={out}",
        ]
    )
    assert code == 0
    profile = Profile.load(tmp_path)  # a folder, as a mounted ConfigMap
    assert [f.name for f in profile.inputs["x"]] == ["age", "income"]
    assert [f.name for f in profile.outputs["score"]] == ["score:0"]
    assert json.loads(out.read_text())["version"] == 1


def test_a_full_queue_drops_samples_and_counts_them_without_blocking() -> None:
    release = threading.Event()

    class SlowWindow(DriftWindow):
        def add(self, kind: str, tensors: Any) -> None:
            release.wait(10)

    registry = CollectorRegistry()
    monitor = DriftMonitor(SlowWindow(reference_profile()), registry, queue_size=2)
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    )
    exchange = InferExchange("m", "http", "10.0.0.1", [], body.encode(), [], b'{"outputs": []}')
    started = time.perf_counter()
    for _ in range(10):
        monitor.submit(exchange)
    assert time.perf_counter() - started < 0.1  # never waits for the worker
    release.set()
    monitor.drain()
    dropped = registry.get_sample_value("modeldeploy_runtime_drift_dropped_total")
    decoded = registry.get_sample_value("modeldeploy_runtime_drift_samples_total")
    assert dropped is not None
    assert decoded is not None
    assert dropped + decoded == 10
    assert 7 <= dropped <= 8  # one in the worker, two queued
    monitor.close()
