"""How many replicas: the HorizontalPodAutoscaler's algorithm as pure functions.

After ``pkg/controller/podautoscaler`` in Kubernetes: each metric proposes a count from the
ratio of its value to its target (nothing changes while the ratio is within the tolerance),
the largest proposal wins, stabilisation windows smooth it (scale up to the *lowest*
recommendation of the up-window, down to the *highest* of the down-window), a maximum step
limits each change, and the result stays within [minReplicas, maxReplicas]. Two additions:
the count never exceeds what the reachable GPUs can hold, and with scale to zero an idle
ModelDeployment goes to 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

EPSILON = 1e-9  # 4.0000000001 replicas is 4, not 5


@dataclass(frozen=True)
class Reading:
    """One metric as measured. ``per_replica``: ``value`` is the total over all replicas
    (in-flight requests, requests per second) and the target is per replica; otherwise the
    value is compared with the target as is (latency, utilisation)."""

    name: str
    value: float | None  # None: no data
    target: float
    per_replica: bool


@dataclass(frozen=True)
class Recommendation:
    time: float  # epoch seconds
    replicas: int


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    scale_to_zero: bool = False
    tolerance: float = 0.1
    up_window: float = 0.0  # seconds
    down_window: float = 300.0
    max_up_step: int | None = None
    max_down_step: int | None = None


@dataclass(frozen=True)
class Inputs:
    now: float
    current: int
    readings: Sequence[Reading]
    history: Sequence[Recommendation] = ()  # earlier raw recommendations, oldest first
    since: float = 0.0  # the history is complete from this time on (the operator's start)
    capacity: int | None = None  # replicas the reachable GPUs can hold; None: unknown
    idle: bool = False  # no requests for scaleToZero.idleAfter


@dataclass(frozen=True)
class MetricProposal:
    name: str
    value: float | None
    target: float
    replicas: int | None


@dataclass(frozen=True)
class Decision:
    replicas: int
    recommendation: int | None  # this evaluation's raw proposal, before stabilisation
    reason: str  # ScaledUp, ScaledDown, ScaledToZero, Steady, NoMetrics
    message: str
    metrics: tuple[MetricProposal, ...]
    at_capacity: bool = False


def metric_replicas(current: int, reading: Reading, tolerance: float) -> int | None:
    """What one metric asks for; None without data."""
    if reading.value is None:
        return None
    if reading.per_replica:
        wanted = reading.value / reading.target
        if current > 0 and abs(wanted / current - 1.0) <= tolerance:
            return current
        return math.ceil(wanted - EPSILON)
    if current == 0:
        return None  # a ratio of nothing; activation decides instead
    ratio = reading.value / reading.target
    if abs(ratio - 1.0) <= tolerance:
        return current
    return math.ceil(current * ratio - EPSILON)


def recommend(
    current: int, readings: Sequence[Reading], tolerance: float
) -> tuple[int | None, tuple[MetricProposal, ...]]:
    """The largest proposal; never a scale-down while some metric has no data (the HPA's
    rule: a missing metric might be the one asking for more)."""
    proposals = tuple(
        MetricProposal(r.name, r.value, r.target, metric_replicas(current, r, tolerance))
        for r in readings
    )
    known = [p.replicas for p in proposals if p.replicas is not None]
    if not known:
        return None, proposals
    best = max(known)
    if len(known) < len(proposals) and best < current:
        best = current
    return best, proposals


def stabilise(
    now: float,
    raw: int,
    current: int,
    history: Sequence[Recommendation],
    since: float,
    policy: Policy,
) -> int:
    """Scale up to the lowest recommendation of the up-window and down to the highest of the
    down-window. Time the history does not cover (after an operator restart) counts as a
    recommendation to stay, so a restart never hastens a scale-down."""

    def window(length: float) -> list[int]:
        start = now - length
        found = [r.replicas for r in history if r.time > start] + [raw]
        if since > start:
            found.append(current)
        return found

    up = min(window(policy.up_window))
    down = max(window(policy.down_window))
    if current < up:
        return up
    if current > down:
        return down
    return current


def limit_step(current: int, wanted: int, policy: Policy) -> int:
    if policy.max_up_step is not None and wanted > current:
        return min(wanted, current + policy.max_up_step)
    if policy.max_down_step is not None and wanted < current:
        return max(wanted, current - policy.max_down_step)
    return wanted


def clamp(replicas: int, policy: Policy) -> int:
    return min(max(replicas, policy.min_replicas), policy.max_replicas)


def describe(proposals: Sequence[MetricProposal]) -> str:
    parts = []
    for p in proposals:
        shown = "no data" if p.value is None else f"{p.value:.4g}"
        asks = "" if p.replicas is None else f" -> {p.replicas}"
        parts.append(f"{p.name} {shown} (target {p.target:g}){asks}")
    return ", ".join(parts)


def desired_replicas(inputs: Inputs, policy: Policy) -> Decision:
    """The replica count to set now, with the reason and the numbers behind it."""
    current = inputs.current
    if policy.scale_to_zero and inputs.idle:
        return Decision(
            0,
            0,
            "ScaledToZero" if current else "Steady",
            "no requests for the idle period",
            (),
        )
    raw, proposals = recommend(current, inputs.readings, policy.tolerance)
    detail = describe(proposals)
    if raw is None:
        # No numbers: keep the count (within bounds; waking from zero goes to minReplicas).
        kept = clamp(current, policy) if current or not policy.scale_to_zero else 0
        return Decision(kept, None, "NoMetrics", f"no metric has data: {detail}", proposals)
    if current == 0 and policy.scale_to_zero:
        # Asleep, the readings are the last scrapes of pods that are gone (an in-flight 1
        # woke it right after it slept): the activator wakes it, on a request; minReplicas
        # applies from then on.
        return Decision(0, raw, "Steady", f"at zero until a request wakes it: {detail}", proposals)
    raw = clamp(raw, policy)
    wanted = clamp(
        limit_step(
            current,
            stabilise(inputs.now, raw, current, inputs.history, inputs.since, policy),
            policy,
        ),
        policy,
    )
    at_capacity = inputs.capacity is not None and wanted > inputs.capacity
    if at_capacity and inputs.capacity is not None:
        # Pods beyond the capacity could never be scheduled: stop there (minReplicas is
        # still honoured, and then reported as unschedulable).
        wanted = max(inputs.capacity, policy.min_replicas)
        detail += f"; the reachable GPUs hold only {inputs.capacity} replicas"
    reason = "ScaledUp" if wanted > current else "ScaledDown" if wanted < current else "Steady"
    return Decision(wanted, raw, reason, detail, proposals, at_capacity)
