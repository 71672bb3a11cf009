"""Drift off the request path: a bounded queue, one worker thread, gauges at scrape time.

Besides the model's drift, each client's sampled inputs are compared with the same reference
profile in a small window of their own: the extraction signal. Extraction attacks query
where the model is uncertain or uniformly at random (Tramèr et al., 2016), far from the data
the model was trained on, so a client whose inputs sit far from the profile while everyone
else's do not is worth a look. Windows are kept for the ``max_clients`` most recent clients.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from modeldeploy_runtime.drift import DecodeError, DriftWindow, decode_grpc, decode_tensors
from modeldeploy_runtime.proxy import InferExchange

LOG = logging.getLogger("modeldeploy.runtime.drift")


class DriftMonitor(Collector):
    """``submit`` never blocks: when the queue is full the sample is dropped and counted."""

    def __init__(  # noqa: PLR0913 - settings, each with a default
        self,
        window: DriftWindow,
        registry: CollectorRegistry,
        queue_size: int = 256,
        top_k: int = 20,
        track: str = "stable",
        *,
        client_window: int = 500,
        client_min_rows: int = 50,
        max_clients: int = 100,
    ) -> None:
        self.window = window
        self._profile = window.profile
        self._client_window = client_window
        self._client_min_rows = client_min_rows
        self._max_clients = max_clients
        self._clients: OrderedDict[str, DriftWindow] = OrderedDict()
        self._clients_lock = threading.Lock()
        self.top_k = top_k
        self.track = track  # a label on the gauges, so canary analysis can select its track
        self._queue: queue.Queue[InferExchange | None] = queue.Queue(maxsize=queue_size)
        self.samples = Counter(
            "modeldeploy_runtime_drift_samples_total",
            "Requests decoded for drift.",
            registry=registry,
        )
        self.dropped = Counter(
            "modeldeploy_runtime_drift_dropped_total",
            "Samples dropped because the drift queue was full.",
            registry=registry,
        )
        self.decode_errors = Counter(
            "modeldeploy_runtime_drift_decode_errors_total",
            "Sampled payloads that could not be decoded as tensors.",
            registry=registry,
        )
        registry.register(self)
        self._thread = threading.Thread(target=self._run, name="drift", daemon=True)
        self._thread.start()

    def submit(self, exchange: InferExchange) -> None:
        try:
            self._queue.put_nowait(exchange)
        except queue.Full:
            self.dropped.inc()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def drain(self) -> None:
        """Wait until every submitted sample is processed (tests, shutdown)."""
        self._queue.join()

    def _run(self) -> None:
        while True:
            exchange = self._queue.get()
            try:
                if exchange is None:
                    return
                if exchange.protocol == "grpc":
                    inputs, outputs = decode_grpc(exchange.request_body, exchange.response_body)
                else:
                    inputs = decode_tensors(
                        exchange.request_headers, exchange.request_body, "inputs"
                    )
                    outputs = decode_tensors(
                        exchange.response_headers, exchange.response_body, "outputs"
                    )
                self.window.add("input", inputs)
                self.window.add("output", outputs)
                self._client(exchange.client).add("input", inputs)
                self.samples.inc()
            except DecodeError:
                self.decode_errors.inc()
            except Exception:  # never let one sample stop drift monitoring
                LOG.exception("Drift sample failed")
                self.decode_errors.inc()
            finally:
                self._queue.task_done()

    def _client(self, client: str) -> DriftWindow:
        with self._clients_lock:
            window = self._clients.pop(client, None) or DriftWindow(
                self._profile, self._client_window
            )
            self._clients[client] = window
            while len(self._clients) > self._max_clients:
                self._clients.popitem(last=False)
            return window

    def client_distances(self) -> dict[str, float]:
        """Largest input PSI per client with enough sampled rows."""
        with self._clients_lock:
            windows = list(self._clients.items())
        return {
            client: max((d.psi for d in window.drift() if d.kind == "input"), default=0.0)
            for client, window in windows
            if window.rows("input") >= self._client_min_rows
        }

    def collect(self) -> Iterator[GaugeMetricFamily]:
        distance_by_client = GaugeMetricFamily(
            "modeldeploy_runtime_client_input_psi",
            "Largest PSI of one client's sampled inputs against the reference profile: the"
            " extraction signal.",
            labels=["track", "client"],
        )
        for client, value in sorted(self.client_distances().items()):
            distance_by_client.add_metric([self.track, client], value)
        yield distance_by_client
        drift = self.window.drift()
        score = GaugeMetricFamily(
            "modeldeploy_runtime_drift_score",
            "Largest PSI over all profiled input and output features.",
            labels=["track"],
        )
        score.add_metric([self.track], max((d.psi for d in drift), default=0.0))
        yield score
        rows = GaugeMetricFamily(
            "modeldeploy_runtime_drift_window_rows",
            "Rows in the drift window.",
            labels=["track", "kind"],
        )
        for kind in ("input", "output"):
            rows.add_metric([self.track, kind], self.window.rows(kind))
        yield rows
        psi = GaugeMetricFamily(
            "modeldeploy_runtime_drift_psi",
            f"Population stability index per feature (the {self.top_k} most drifted).",
            labels=["track", "kind", "feature"],
        )
        distance = GaugeMetricFamily(
            "modeldeploy_runtime_drift_ks",
            f"Kolmogorov-Smirnov distance per feature (the {self.top_k} most drifted).",
            labels=["track", "kind", "feature"],
        )
        for item in sorted(drift, key=lambda d: d.psi, reverse=True)[: self.top_k]:
            psi.add_metric([self.track, item.kind, item.feature], item.psi)
            distance.add_metric([self.track, item.kind, item.feature], item.ks)
        yield psi
        yield distance
