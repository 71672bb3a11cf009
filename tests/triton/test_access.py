"""API keys and rate limits with tritonclient against the sidecar and a real Triton."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from triton_support import Sidecar, SidecarFactory, scrape, value

pytestmark = pytest.mark.triton


def infer(sidecar: Sidecar, headers: dict[str, str] | None = None) -> str:
    """The HTTP status as a string ("200" on success)."""
    client = httpclient.InferenceServerClient(sidecar.http)
    x = httpclient.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.ones((1, 2), np.float32))
    try:
        client.infer("double", [x], headers=headers)
    except InferenceServerException as error:
        return str(error.status())
    return "200"


def counter(sidecar: Sidecar, outcome: str) -> float:
    return value(
        scrape(sidecar.metrics), "modeldeploy_runtime_client_requests_total", outcome=outcome
    )


def test_api_keys(sidecar: SidecarFactory, tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "clients").write_text("k-one\nk-two\n")
    proxy = sidecar(model="double", api_keys_dir=tmp_path / "keys")
    assert infer(proxy) == "401"
    assert infer(proxy, {"Authorization": "Bearer wrong"}) == "401"
    assert infer(proxy, {"Authorization": "Bearer k-one"}) == "200"
    assert infer(proxy, {"X-API-Key": "k-two"}) == "200"
    # Health stays open for load balancers; metadata does not.
    with urllib.request.urlopen(f"http://{proxy.http}/v2/health/ready", timeout=5) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://{proxy.http}/v2/models/double", timeout=5)
    assert caught.value.code == 401
    assert caught.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert counter(proxy, "unauthorized") == 3
    assert counter(proxy, "admitted") == 2  # the two inferences; health checks are not counted


def test_rate_limit_per_client(sidecar: SidecarFactory, tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "clients").write_text("fast\npolite\n")
    proxy = sidecar(model="double", api_keys_dir=tmp_path / "keys", rate_limit_per_client="5/s")
    statuses = [infer(proxy, {"X-API-Key": "fast"}) for _ in range(20)]
    assert 5 <= statuses.count("200") <= 8  # a burst of 5, plus what refills meanwhile
    assert statuses.count("429") == 20 - statuses.count("200")
    assert infer(proxy, {"X-API-Key": "polite"}) == "200"  # another client, another bucket
    request = urllib.request.Request(
        f"http://{proxy.http}/v2/models/double/infer", data=b"{}", headers={"X-API-Key": "fast"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)  # noqa: S310
    assert caught.value.code == 429
    assert int(caught.value.headers["Retry-After"]) >= 1
    assert counter(proxy, "rate_limited") == statuses.count("429") + 1
