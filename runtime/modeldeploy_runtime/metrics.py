"""The sidecar's Prometheus metrics, in a registry of its own.

Base units, ``_total`` counters, and bounded labels: the model and version label take the
configured model's values or ``other``; no request ids, no client ids, no feature values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from modeldeploy_runtime.access import ClientLabels

# 0.5 ms to 10 s, roughly x2 apart.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
SIZE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
OTHER = "other"
MAX_UNCONFIGURED_LABELS = 16


class RuntimeMetrics:
    def __init__(self, track: str, model: str = "", version: str = "") -> None:
        self.track = track
        self.model = model
        self.version = version
        self.registry = CollectorRegistry()
        labels = ["model", "version", "track"]
        self.duration = Histogram(
            "modeldeploy_runtime_request_duration_seconds",
            "Inference request latency through the sidecar, from request read to response sent.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "modeldeploy_runtime_requests_total",
            "Inference requests, by HTTP status code.",
            [*labels, "code"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "modeldeploy_runtime_requests_in_flight",
            "Inference requests being served now.",
            ["track"],
            registry=self.registry,
        )
        self.request_bytes = Histogram(
            "modeldeploy_runtime_request_bytes",
            "Size of inference request bodies.",
            labels,
            buckets=SIZE_BUCKETS,
            registry=self.registry,
        )
        self.response_bytes = Histogram(
            "modeldeploy_runtime_response_bytes",
            "Size of inference response bodies.",
            labels,
            buckets=SIZE_BUCKETS,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "modeldeploy_runtime_upstream_errors_total",
            "Requests Triton could not answer: connect, timeout or protocol.",
            ["reason"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "modeldeploy_runtime_rejected_requests_total",
            "Requests the sidecar refused before Triton saw them, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.client_requests = Counter(
            "modeldeploy_runtime_client_requests_total",
            "Requests per client (API key hash, or address without keys), by outcome.",
            ["client", "outcome"],
            registry=self.registry,
        )
        self.in_flight_track = self.in_flight.labels(track)
        self._seen = ClientLabels(limit=MAX_UNCONFIGURED_LABELS)

    def bounded(self, model: str, version: str) -> tuple[str, str]:
        """Label values that cannot explode: the configured model, or ``other``. Without a
        configured model, the first few names seen (requests for unknown models must not
        mint series): the first 16 model/version pairs seen."""
        if self.model and model != self.model:
            return OTHER, OTHER
        if not self.model and self._seen.label(f"{model}\x00{version}") == OTHER:
            return OTHER, OTHER
        if self.version and version not in ("", self.version):
            return model, OTHER
        return model, version or self.version


class BudgetCollector(Collector):
    """``client_budget_used{client}``: calls each key made here within the budget's window;
    the operator sums it over the replicas."""

    def __init__(self, used: Callable[[], Mapping[str, int]], track: str) -> None:
        self._used = used
        self._track = track

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "modeldeploy_runtime_client_budget_used",
            "Inference calls each API key made through this pod within its query budget's window.",
            labels=["track", "client"],
        )
        for client, count in sorted(self._used().items()):
            gauge.add_metric([self._track, client], count)
        yield gauge
