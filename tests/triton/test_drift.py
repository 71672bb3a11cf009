"""Drift end to end: requests through the sidecar to a real Triton, PSI in /metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from numpy.typing import NDArray

from modeldeploy_runtime.drift import Profile, profile_features
from triton_support import Samples, Sidecar, SidecarFactory, scrape

pytestmark = pytest.mark.triton

REQUESTS, ROWS = 40, 50  # one window of 2000 rows


def psi(samples: Samples, kind: str) -> dict[str, float]:
    return {
        dict(labels)["feature"]: value
        for (name, labels), value in samples.items()
        if name == "modeldeploy_runtime_drift_psi" and dict(labels)["kind"] == kind
    }


def send(sidecar: Sidecar, batches: list[NDArray[Any]], protocol: str) -> None:
    if protocol == "grpc":
        channel = grpcclient.InferenceServerClient(sidecar.grpc)
        for rows in batches:
            x = grpcclient.InferInput("x", list(rows.shape), "FP32")
            x.set_data_from_numpy(rows.astype(np.float32))
            channel.infer("features", [x])
        return
    client = httpclient.InferenceServerClient(sidecar.http)
    for i, rows in enumerate(batches):
        x = httpclient.InferInput("x", list(rows.shape), "FP32")
        x.set_data_from_numpy(rows.astype(np.float32), binary_data=i % 2 == 0)
        client.infer(
            "features",
            [x],
            outputs=[httpclient.InferRequestedOutput("score", binary_data=i % 3 == 0)],
        )


def wait_decoded(sidecar: Sidecar, count: int) -> Samples:
    deadline = time.monotonic() + 20
    while True:
        samples = scrape(sidecar.metrics)
        if samples.get(("modeldeploy_runtime_drift_samples_total", ())) == count:
            return samples
        assert time.monotonic() < deadline, "the drift worker did not catch up"
        time.sleep(0.1)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_psi_stays_low_on_reference_like_data_and_flags_a_shifted_feature(
    sidecar: SidecarFactory, tmp_path: Path, protocol: str
) -> None:
    rng = np.random.default_rng(11)
    reference = rng.normal(size=(20000, 4))
    profile = Profile(
        inputs={"x": profile_features("x", reference, 10)},
        outputs={"score": profile_features("score", reference.sum(axis=1, keepdims=True), 10)},
    )
    (tmp_path / "profile.json").write_text(json.dumps(profile.to_json()))
    proxy = sidecar(
        model="features", reference_profile=tmp_path, sample_rate=1.0, drift_window=REQUESTS * ROWS
    )

    send(proxy, [rng.normal(size=(ROWS, 4)) for _ in range(REQUESTS)], protocol)
    samples = wait_decoded(proxy, REQUESTS)
    assert (
        samples[("modeldeploy_runtime_drift_window_rows", (("kind", "input"), ("track", "stable")))]
        == REQUESTS * ROWS
    )
    assert all(v < 0.1 for v in psi(samples, "input").values()), psi(samples, "input")
    assert psi(samples, "output")["score:0"] < 0.1
    assert samples[("modeldeploy_runtime_drift_score", (("track", "stable"),))] < 0.1

    shifted = []
    for _ in range(REQUESTS):
        rows = rng.normal(size=(ROWS, 4))
        rows[:, 2] += 2.0  # two standard deviations
        shifted.append(rows)
    send(proxy, shifted, protocol)
    samples = wait_decoded(proxy, 2 * REQUESTS)
    inputs = psi(samples, "input")
    assert inputs["x:2"] > 0.25, inputs
    assert all(v < 0.1 for k, v in inputs.items() if k != "x:2"), inputs
    assert psi(samples, "output")["score:0"] > 0.25  # the outputs moved too
    assert samples[("modeldeploy_runtime_drift_score", (("track", "stable"),))] == pytest.approx(
        max(inputs["x:2"], psi(samples, "output")["score:0"])
    )
    assert samples[("modeldeploy_runtime_drift_dropped_total", ())] == 0
    assert samples[("modeldeploy_runtime_drift_decode_errors_total", ())] == 0
