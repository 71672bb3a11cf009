"""The Prometheus metrics provider against a real Prometheus scraping a real endpoint."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from localcluster.operator import free_port
from modeldeploy_operator.metrics.prometheus import PrometheusProvider, ProviderError
from prometheus_support import prometheus_binary, start_prometheus

pytestmark = pytest.mark.prometheus


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusProvider]:
    if prometheus_binary() is None:
        if os.environ.get("MODELDEPLOY_REQUIRE_ALL"):
            pytest.fail("prometheus is not installed; .ci/run installs it with apt-get")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    registry = CollectorRegistry()
    Gauge("probe_drift_score", "A fixed value.", registry=registry).set(0.42)
    series = Gauge("probe_per_track", "Two series.", ["track"], registry=registry)
    series.labels("stable").set(1)
    series.labels("canary").set(2)
    Counter("probe_requests", "Counts.", registry=registry).inc(10)
    target = free_port()
    server, _thread = start_http_server(target, addr="127.0.0.1", registry=registry)
    port = free_port()
    proc = start_prometheus(
        tmp_path_factory.mktemp("prometheus"),
        port,
        {"probe": [f"127.0.0.1:{target}"]},
        target_labels={"probe": {"modeldeployment": "resnet50"}},
    )
    provider = PrometheusProvider(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    while provider.query('up{job="probe"}') != 1.0:
        assert time.monotonic() < deadline, "Prometheus never scraped the probe"
        time.sleep(0.3)
    yield provider
    proc.terminate()
    proc.wait(timeout=20)
    server.shutdown()


def test_a_value(prometheus: PrometheusProvider) -> None:
    assert prometheus.query('probe_drift_score{modeldeployment="resnet50"}') == pytest.approx(0.42)
    assert prometheus.query('probe_per_track{track="canary"}') == 2.0
    assert prometheus.query("scalar(probe_requests_total)") == 10.0


def test_no_data_is_none(prometheus: PrometheusProvider) -> None:
    assert prometheus.query('probe_drift_score{modeldeployment="absent"}') is None
    assert prometheus.query("probe_drift_score / 0 * 0") is None  # NaN


def test_ambiguous_and_bad_queries_are_errors(prometheus: PrometheusProvider) -> None:
    with pytest.raises(ProviderError, match="expected one series, got 2"):
        prometheus.query("probe_per_track")
    with pytest.raises(ProviderError, match="bad_data"):
        prometheus.query("sum(")


def test_prometheus_down_is_an_error() -> None:
    with pytest.raises(ProviderError, match="unreachable"):
        PrometheusProvider(f"http://127.0.0.1:{free_port()}", timeout=2).query("up")


def test_a_vector_by_label(prometheus: PrometheusProvider) -> None:
    """What query budgets read: one value per series, by a label."""
    by_track = prometheus.query_by("sum by (track) (probe_per_track)", "track")
    assert by_track == {"stable": 1.0, "canary": 2.0}
    assert prometheus.query_by('probe_per_track{track="absent"}', "track") == {}
    with pytest.raises(ProviderError):
        prometheus.query_by("sum(rate(probe_requests_total[1m])", "track")
