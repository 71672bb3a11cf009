"""Triton's server-side queue and compute time, derived from deltas of its statistics.

Triton reports cumulative nanoseconds per model (``/v2/models/<m>/stats``). Re-exporting
those raw counters would duplicate Triton's own metrics; instead the sidecar polls them and
exports, per interval, the mean queue and compute time of the inferences that happened in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from modeldeploy_runtime.proxy import Upstream, UpstreamError
from modeldeploy_runtime.settings import RuntimeSettings

LOG = logging.getLogger("modeldeploy.runtime.stats")


@dataclass(frozen=True)
class Snapshot:
    inferences: int  # successful requests Triton counted
    queue_ns: int
    compute_ns: int  # compute_input + compute_infer + compute_output


def parse_stats(document: Mapping[str, Any], model: str, version: str = "") -> Snapshot | None:
    """The cumulative counters of ``model`` (summed over versions unless one is given)."""
    found = [
        s
        for s in document.get("model_stats", [])
        if s.get("name") == model and (not version or str(s.get("version")) == version)
    ]
    if not found:
        return None

    def ns(stats: Mapping[str, Any], key: str) -> int:
        return int(stats.get("inference_stats", {}).get(key, {}).get("ns", 0))

    return Snapshot(
        inferences=sum(
            int(s.get("inference_stats", {}).get("success", {}).get("count", 0)) for s in found
        ),
        queue_ns=sum(ns(s, "queue") for s in found),
        compute_ns=sum(
            ns(s, k) for s in found for k in ("compute_input", "compute_infer", "compute_output")
        ),
    )


def interval_means(previous: Snapshot, current: Snapshot) -> tuple[float, float] | None:
    """Mean queue and compute seconds per inference between two snapshots; None when no
    inference happened (or Triton restarted and its counters went back)."""
    count = current.inferences - previous.inferences
    if count <= 0 or current.queue_ns < previous.queue_ns:
        return None
    return (
        (current.queue_ns - previous.queue_ns) / count / 1e9,
        (current.compute_ns - previous.compute_ns) / count / 1e9,
    )


class StatsPoller:
    def __init__(
        self, settings: RuntimeSettings, registry: CollectorRegistry, interval: float
    ) -> None:
        self.settings = settings
        self.interval = interval
        labels = ["model", "version", "track"]
        self.queue = Gauge(
            "modeldeploy_runtime_triton_queue_seconds",
            "Mean time Triton queued an inference, over the last polling interval.",
            labels,
            registry=registry,
        )
        self.compute = Gauge(
            "modeldeploy_runtime_triton_compute_seconds",
            "Mean time Triton computed an inference (input, infer, output), last interval.",
            labels,
            registry=registry,
        )
        self.inferences = Gauge(
            "modeldeploy_runtime_triton_inference_count",
            "Successful inferences Triton itself counted since it started (its statistics):"
            " beside the door's own counts, it shows nothing reached Triton another way.",
            labels,
            registry=registry,
        )
        self._labels = (settings.model, settings.model_version, settings.track)

    async def run(self, stop: asyncio.Event) -> None:
        version = f"/versions/{self.settings.model_version}" if self.settings.model_version else ""
        path = f"/v2/models/{self.settings.model}{version}/stats".encode()
        upstream = Upstream(self.settings)
        previous: Snapshot | None = None
        try:
            while not stop.is_set():
                try:
                    _, body = await upstream.get(path)
                    current = parse_stats(
                        json.loads(body or b"{}"),
                        self.settings.model,
                        self.settings.model_version,
                    )
                except (UpstreamError, ValueError) as error:
                    LOG.debug("Could not read Triton's statistics: %s", error)
                    current = None
                if current is not None:
                    self.inferences.labels(*self._labels).set(current.inferences)
                if previous is not None and current is not None:
                    means = interval_means(previous, current)
                    if means is not None:
                        self.queue.labels(*self._labels).set(means[0])
                        self.compute.labels(*self._labels).set(means[1])
                previous = current or previous
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval)
        finally:
            upstream.close()
