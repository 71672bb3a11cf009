"""The one typed context the operator's code receives (kopf's memo): no module globals."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from modeldeploy_operator.autoscaling.plan import ScalingState
from modeldeploy_operator.builders.deployment import BuildConfig
from modeldeploy_operator.cache import ClusterCache
from modeldeploy_operator.events import EventCorrelator
from modeldeploy_operator.k8s.client import ApiError, KubeApi
from modeldeploy_operator.metrics.prometheus import MetricsProvider, PrometheusProvider
from modeldeploy_operator.status import MissingReference
from modeldeploy_operator.telemetry import Telemetry
from modeldeploy_operator.workqueue import ExponentialBackoff

GPU_PRESENT_SELECTOR = "nvidia.com/gpu.present=true"
APPLY_RETRY_SECONDS = 10.0  # a refused write is sent again after this, doubling...
APPLY_RETRY_MAX_SECONDS = 300.0  # ...up to every five minutes
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class GpuInventory:
    """The GPU products the cluster's nodes carry, re-listed at most every ``ttl`` seconds.

    ``None`` when nodes cannot be listed (namespace-scoped RBAC): the check is then skipped
    rather than guessed.
    """

    def __init__(
        self, api: KubeApi, ttl: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._api = api
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[float, frozenset[str] | None] | None = None

    def products(self) -> frozenset[str] | None:
        with self._lock:
            if self._cached is not None and self._clock() - self._cached[0] < self._ttl:
                return self._cached[1]
        try:
            nodes = self._api.list("v1", "Node", None, GPU_PRESENT_SELECTOR)
            found: frozenset[str] | None = frozenset(
                n["metadata"]["labels"][GPU_PRODUCT_LABEL]
                for n in nodes
                if GPU_PRODUCT_LABEL in n["metadata"].get("labels", {})
            )
        except ApiError as error:
            if error.status not in (401, 403):
                raise
            found = None
        with self._lock:
            self._cached = (self._clock(), found)
        return found


class ScalingMemory:
    """Per-ModelDeployment autoscaler memory. Kept in memory like the HPA's recommendations;
    an operator restart starts empty, and the algorithm then treats the unknown past as "stay"
    (see ``autoscaling.decide.stabilise``), so a restart never hastens a scale-down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[tuple[str, str], ScalingState] = {}

    def state(self, key: tuple[str, str], now: float) -> ScalingState:
        with self._lock:
            return self._states.setdefault(key, ScalingState(since=now, awake_since=now))

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._states.pop(key, None)


@dataclass(frozen=True)
class ReferencesChecked:
    """The last look at the Secrets and ConfigMaps a ModelDeployment names."""

    generation: int | None  # of the spec they were read for
    missing: tuple[MissingReference, ...]


@dataclass
class OperatorContext:
    api: KubeApi
    build: BuildConfig
    telemetry: Telemetry
    gpus: GpuInventory
    logger: logging.Logger
    clock: Callable[[], str] = utc_now
    epoch: Callable[[], float] = time.time
    metrics_provider: Callable[[str], MetricsProvider] = PrometheusProvider
    prometheus_url: str | None = None  # used when a ModelDeployment names none
    api_timeout: float = 10.0  # seconds, for kopf's connections (KubernetesApi has its own)
    resync_seconds: float = 30.0
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    # The activator's Service (namespace, name): where scaled-to-zero models' callers go.
    activator_service: tuple[str, str] | None = None
    scaling: ScalingMemory = field(default_factory=ScalingMemory)
    # The last refused apply per object: act runs after the status write, so the next pass
    # reports it (ApplyFailed) and clears it once an apply succeeds.
    apply_errors: dict[tuple[str, str], str] = field(default_factory=dict)
    # After a refusal: (the generation refused, when to try again), and each object's backoff.
    apply_holds: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    apply_backoff: ExponentialBackoff[tuple[str, str]] = field(
        default_factory=lambda: ExponentialBackoff(APPLY_RETRY_SECONDS, APPLY_RETRY_MAX_SECONDS)
    )
    # What the last look at each object's referenced Secrets and ConfigMaps found.
    references: dict[tuple[str, str], ReferencesChecked] = field(default_factory=dict)
    # What the watches know (kopf's and the reflectors'); passes read their snapshot from it
    # once ready, and from the API server before (and in tools that run no watches).
    cache: ClusterCache = field(default_factory=ClusterCache)
    # The Events posted (aggregation and the per-object spam filter, after client-go's).
    events: EventCorrelator = field(default_factory=EventCorrelator)
    # Node cache labels already put on nodes (nodecache): each is patched once per process.
    node_labels: set[tuple[str, str]] = field(default_factory=set)
