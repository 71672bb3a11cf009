"""Shadow traffic between two real sidecars in front of a real Triton: the stable sidecar
copies a share of its answered requests to the canary's, compares the answers, and the user's
answers never depend on the canary (a canary that is down or slow changes nothing for them)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from localcluster.operator import free_port
from triton_support import Sidecar, SidecarFactory, scrape, value

pytestmark = pytest.mark.triton

TOTAL = "modeldeploy_runtime_shadow_requests_total"


def shadow_file(tmp_path: Path, target: str, percent: float = 100, grpc: str = "") -> Path:
    path = tmp_path / "shadow.json"
    config = {
        "revision": "canary1",
        "version": "2",
        "percent": percent,
        "targets": [target],
        "grpcTargets": [grpc] if grpc else [],
    }
    path.write_text(json.dumps(config))
    return path


def send(sidecar: Sidecar, count: int, binary: bool = False) -> list[Any]:
    client = httpclient.InferenceServerClient(sidecar.http)
    answers = []
    for i in range(count):
        x = httpclient.InferInput("x", [2, 4], "FP32")
        x.set_data_from_numpy(np.arange(8, dtype=np.float32).reshape(2, 4) + i, binary_data=binary)
        out = httpclient.InferRequestedOutput("y", binary_data=binary)
        answers.append(client.infer("double", [x], outputs=[out]).as_numpy("y"))
    return answers


def wait_mirrored(stable: Sidecar, count: int, result: str) -> None:
    deadline = time.monotonic() + 20
    while value(scrape(stable.metrics), TOTAL, result=result) < count:
        assert time.monotonic() < deadline, scrape(stable.metrics)
        time.sleep(0.1)


def test_a_canary_answering_the_same_is_compared_on_every_copied_request(
    sidecar: SidecarFactory, tmp_path: Path
) -> None:
    canary = sidecar(model="double", track="canary")
    stable = sidecar(model="double", shadow_file=shadow_file(tmp_path, canary.http))
    time.sleep(1.1)  # the sidecar looks at the file at most once a second
    answers = send(stable, 10) + send(stable, 10, binary=True)
    assert all(np.array_equal(a[0], 2 * (np.arange(4) + i % 10)) for i, a in enumerate(answers))
    wait_mirrored(stable, 20, "compared")
    samples = scrape(stable.metrics)
    labels = {"revision": "canary1", "output": "y"}
    assert value(samples, "modeldeploy_runtime_shadow_rows_total", **labels) == 40
    assert value(samples, "modeldeploy_runtime_shadow_disagreements_total", **labels) == 0
    assert value(samples, "modeldeploy_runtime_shadow_relative_error_total", **labels) == 0
    assert value(samples, "modeldeploy_runtime_shadow_duration_seconds_count", side="canary") == 20
    # The canary's own door counted exactly the copies: nothing else reached it.
    served = value(scrape(canary.metrics), "modeldeploy_runtime_requests_total", track="canary")
    assert served == 20


def test_copies_to_a_canary_that_is_down_or_slow_never_touch_the_users_answers(
    sidecar: SidecarFactory, tmp_path: Path
) -> None:
    down = f"127.0.0.1:{free_port()}"  # nothing listens
    stable = sidecar(model="double", shadow_file=shadow_file(tmp_path, down))
    time.sleep(1.1)
    answers = send(stable, 20)
    assert len(answers) == 20
    wait_mirrored(stable, 20, "unreachable")
    assert value(scrape(stable.metrics), "modeldeploy_runtime_requests_total", code="200") == 20
    # A canary whose Triton does not answer in time: timeouts, counted as the canary's.
    slow = sidecar(model="double", track="canary", upstream=f"127.0.0.1:{free_port()}")
    path = shadow_file(tmp_path, slow.http)
    stable = sidecar(model="double", shadow_file=path, shadow_timeout_seconds=0.5)
    time.sleep(1.1)
    assert len(send(stable, 5)) == 5
    wait_mirrored(stable, 5, "error")  # the canary's sidecar answers 502: its Triton is gone


def test_a_partial_share_is_copied_and_no_file_copies_nothing(
    sidecar: SidecarFactory, tmp_path: Path
) -> None:
    canary = sidecar(model="double", track="canary")
    path = shadow_file(tmp_path, canary.http, percent=30)
    stable = sidecar(model="double", shadow_file=path)
    time.sleep(1.1)
    send(stable, 100)
    time.sleep(1)
    copied = value(scrape(stable.metrics), TOTAL)
    assert 10 <= copied <= 55, copied  # 30 expected; the binomial's 5-sigma bounds
    path.unlink()
    time.sleep(1.1)
    send(stable, 20)
    time.sleep(0.5)
    assert value(scrape(stable.metrics), TOTAL) == copied


def test_a_canary_never_copies_and_a_copy_is_never_copied_again(
    sidecar: SidecarFactory, tmp_path: Path
) -> None:
    """Every sidecar reads the same config: the canary's own must not copy to itself (the
    copies would feed themselves), nor may a stable sidecar copy a copy."""
    canary = sidecar(model="double", track="canary", shadow_file=shadow_file(tmp_path, "x:1"))
    target = sidecar(model="double", track="canary")
    stable = sidecar(model="double", shadow_file=shadow_file(tmp_path, target.http))
    time.sleep(1.1)
    send(canary, 5)
    client = httpclient.InferenceServerClient(stable.http)
    x = httpclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    client.infer("double", [x], headers={"x-modeldeploy-mirror": "1"})
    send(stable, 1)
    wait_mirrored(stable, 1, "compared")
    time.sleep(0.5)
    assert value(scrape(canary.metrics), TOTAL) == 0
    assert value(scrape(stable.metrics), TOTAL) == 1  # the plain request only


def test_copies_carry_the_callers_key_and_cost_no_budget_at_the_canary(
    sidecar: SidecarFactory, tmp_path: Path
) -> None:
    """The canary's door checks the caller's key on a copy, but its budget was spent at
    stable's door: a copy (proved by the token the ModelDeployment's sidecars share) costs
    nothing more, and a forged mirror header buys nothing."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "keys").write_text("secret-key\n")
    door = {"api_keys_dir": keys, "client_salt": "uid-1", "query_budget": "3/1h"}
    canary = sidecar(model="double", track="canary", **door)
    stable = sidecar(model="double", shadow_file=shadow_file(tmp_path, canary.http), **door)
    time.sleep(1.1)
    client = httpclient.InferenceServerClient(stable.http)
    x = httpclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), dtype=np.float32))
    auth = {"authorization": "Bearer secret-key"}
    for _ in range(3):
        client.infer("double", [x], headers=auth)
    wait_mirrored(stable, 3, "compared")  # not refused: the key went with each copy
    used = "modeldeploy_runtime_client_budget_used"
    assert value(scrape(stable.metrics), used) == 3
    assert value(scrape(canary.metrics), used) == 0
    forged = httpclient.InferenceServerClient(canary.http)
    for _ in range(3):
        forged.infer("double", [x], headers={**auth, "x-modeldeploy-mirror": "1"})
    assert value(scrape(canary.metrics), used) == 3  # a forged header is an ordinary call
    with pytest.raises(InferenceServerException, match="budget"):
        forged.infer("double", [x], headers={**auth, "x-modeldeploy-mirror": "1"})


def test_grpc_calls_are_copied_and_compared_too(sidecar: SidecarFactory, tmp_path: Path) -> None:
    canary = sidecar(model="double", track="canary")
    path = shadow_file(tmp_path, canary.http, grpc=canary.grpc)
    stable = sidecar(model="double", shadow_file=path)
    time.sleep(1.1)
    client = grpcclient.InferenceServerClient(stable.grpc)
    for i in range(10):
        x = grpcclient.InferInput("x", [2, 4], "FP32")
        x.set_data_from_numpy(np.arange(8, dtype=np.float32).reshape(2, 4) + i)
        answer = client.infer("double", [x]).as_numpy("y")
        assert answer is not None
        assert np.array_equal(answer[0], 2 * (np.arange(4) + i))
    wait_mirrored(stable, 10, "compared")
    samples = scrape(stable.metrics)
    labels = {"revision": "canary1", "output": "y"}
    assert value(samples, "modeldeploy_runtime_shadow_rows_total", **labels) == 20
    assert value(samples, "modeldeploy_runtime_shadow_disagreements_total", **labels) == 0
    served = value(scrape(canary.metrics), "modeldeploy_runtime_requests_total", track="canary")
    assert served == 10  # the copies, and nothing else
