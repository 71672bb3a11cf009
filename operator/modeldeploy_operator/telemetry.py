"""The operator's own Prometheus metrics, in a registry of its own (no global state)."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PHASES = ("Pending", "Progressing", "Available", "Degraded", "Failed")


class PhaseCollector(Collector):
    """``modeldeploy_modeldeployments{phase}``: computed at scrape time from the last phases."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def set(self, key: tuple[str, str], phase: str) -> None:
        with self._lock:
            self._phases[key] = phase

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._phases.pop(key, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            tally = Tally(self._phases.values())
        family = GaugeMetricFamily(
            "modeldeploy_modeldeployments",
            "ModelDeployments managed by this operator, by phase.",
            labels=["phase"],
        )
        for phase in PHASES:
            family.add_metric([phase], tally.get(phase, 0))
        yield family


class CacheCollector:
    """``modeldeploy_operator_cache_objects{kind}``: what the watch cache holds, read from
    ``source`` at each scrape."""

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, int]] = dict

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "modeldeploy_operator_cache_objects",
            "Objects the operator's watch cache holds, by kind.",
            labels=["kind"],
        )
        for kind, count in sorted(self.source().items()):
            family.add_metric([kind], count)
        yield family


class WatchSilenceCollector:
    """``modeldeploy_operator_watch_silence_seconds{watch}``: seconds since each child watch
    last heard from the API server, read from ``source`` at each scrape."""

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, float]] = dict

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "modeldeploy_operator_watch_silence_seconds",
            "Seconds since the watch last heard from the API server (an event, a bookmark, a"
            " list); bookmarks come about every minute.",
            labels=["watch"],
        )
        for watch, seconds in sorted(self.source().items()):
            family.add_metric([watch], seconds)
        yield family


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconcile_duration = Histogram(
            "modeldeploy_reconcile_duration_seconds",
            "Time one reconcile of a ModelDeployment took.",
            ["result"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "modeldeploy_reconcile_errors_total",
            "Reconciles that ended in an error, by kind of error.",
            ["reason"],
            registry=self.registry,
        )
        self.reconcile_errors.labels("unexpected")  # a 0 series, so rate() alerts have data
        self.api_requests = Counter(
            "modeldeploy_api_requests_total",
            "Requests the operator made to the Kubernetes API.",
            ["verb", "kind", "code"],
            registry=self.registry,
        )
        self.events_dropped = Counter(
            "modeldeploy_events_dropped_total",
            "Events not posted: their object spent its burst of 25 (one more every 5 minutes).",
            ["type", "reason"],
            registry=self.registry,
        )
        self.events = Counter(
            "modeldeploy_events_total",
            "Kubernetes Events the operator emitted.",
            ["type", "reason"],
            registry=self.registry,
        )
        self.leader = Gauge(
            "modeldeploy_operator_leader",
            "1 while this process holds the leader Lease (or runs without election), else 0.",
            registry=self.registry,
        )
        self.reconcile_over_budget = Counter(
            "modeldeploy_operator_reconcile_over_budget_total",
            "Reconciles of one ModelDeployment that took longer than --reconcile-budget-seconds.",
            registry=self.registry,
        )
        # The work queue's, after client-go's workqueue metrics.
        self.workqueue_depth = Gauge(
            "modeldeploy_operator_workqueue_depth",
            "ModelDeployments waiting in the work queue for a worker.",
            registry=self.registry,
        )
        self.workqueue_delayed = Gauge(
            "modeldeploy_operator_workqueue_delayed",
            "ModelDeployments scheduled to be reconciled again later: a rollout step's or an"
            " analysis's time, a retry's backoff.",
            registry=self.registry,
        )
        self.wake_seconds = Histogram(
            "modeldeploy_wake_seconds",
            "Time from a ModelDeployment's scale-up from zero to its first Ready pod, as the"
            " operator saw it (the activator's modeldeploy_activator_wake_seconds adds the"
            " held request's own wait and answer).",
            buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900),
            registry=self.registry,
        )
        self.workqueue_wait = Histogram(
            "modeldeploy_operator_workqueue_queue_wait_seconds",
            "Time a ModelDeployment waited in the work queue (from when it was added or due)"
            " until a worker took it.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.workqueue_retries = Counter(
            "modeldeploy_operator_workqueue_retries_total",
            "Reconciles retried with backoff after a failure.",
            registry=self.registry,
        )
        self.watch_stalls = Counter(
            "modeldeploy_operator_watch_stalls_total",
            "Watch streams dropped after hearing nothing (no event, no bookmark) for"
            " --watch-inactivity-timeout, and resumed from their last resourceVersion.",
            ["watch"],
            registry=self.registry,
        )
        self.watch_relists = Counter(
            "modeldeploy_operator_watch_relists_total",
            "Watches that listed everything again: expired (410 Gone) or after an error.",
            ["watch", "reason"],
            registry=self.registry,
        )
        self.watch_silence = WatchSilenceCollector()
        self.registry.register(self.watch_silence)
        self.phases = PhaseCollector()
        self.registry.register(self.phases)
        self.cache_objects = CacheCollector()
        self.registry.register(self.cache_objects)

    def count_request(self, verb: str, kind: str, code: int) -> None:
        self.api_requests.labels(verb, kind, str(code)).inc()
