"""Who may hold the Lease: pure decisions over the Lease's record and a monotonic clock.

After client-go's ``leaderelection``: a candidate never trusts the holder's clock. It times a
record from the moment it first saw it (:func:`observe`); a holder that stops renewing is
replaced ``leaseDurationSeconds`` after the last change this candidate saw. The holder itself
stops acting once ``renew_deadline`` has passed since its last successful renewal
(:func:`still_leading`), which is shorter than the lease duration, so its last write lands
before anybody else may take over. Who wins a race is settled by the API server: every
write carries the resourceVersion that was read (optimistic concurrency).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

LEASE_API_VERSION = "coordination.k8s.io/v1"


@dataclass(frozen=True)
class Timing:
    """client-go's defaults: a lease of 15 s, renewed every 2 s, given up after 10 s."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs retry period < renew deadline < lease duration, got"
                f" {self.retry_period:g} s, {self.renew_deadline:g} s, {self.lease_duration:g} s"
            )


@dataclass(frozen=True)
class LeaseRecord:
    """The Lease's spec, the part the election reads and writes."""

    holder: str = ""  # empty: free for anyone
    duration_seconds: int = 0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0

    @classmethod
    def of(cls, lease: Mapping[str, Any]) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return cls(
            holder=spec.get("holderIdentity") or "",
            duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "holderIdentity": self.holder or None,
            "leaseDurationSeconds": self.duration_seconds,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }
        return {key: value for key, value in spec.items() if value is not None}


@dataclass(frozen=True)
class Observation:
    """A Lease as one candidate saw it: ``record`` is None while no Lease exists; ``since`` is
    this candidate's monotonic time when the record first looked like this."""

    record: LeaseRecord | None
    resource_version: str | None
    since: float


def observe(
    previous: Observation | None,
    record: LeaseRecord | None,
    resource_version: str | None,
    now: float,
) -> Observation:
    """The new observation: an unchanged record keeps the time it was first seen (a holder
    that stopped renewing ages), a changed one starts again from ``now``."""
    if previous is not None and previous.record == record:
        return replace(previous, resource_version=resource_version)
    return Observation(record, resource_version, now)


class Verdict(enum.Enum):
    CREATE = "create"  # no Lease yet: create it, holding it
    RENEW = "renew"  # ours: renew it
    TAKE = "take"  # free, or its holder stopped renewing: take it over
    WAIT = "wait"  # somebody else holds it and renews it


def decide(identity: str, seen: Observation, now: float) -> Verdict:
    """May ``identity`` write the Lease now, and how."""
    record = seen.record
    if record is None:
        return Verdict.CREATE
    if record.holder == identity:
        return Verdict.RENEW
    if not record.holder or now >= seen.since + record.duration_seconds:
        return Verdict.TAKE
    return Verdict.WAIT


def still_leading(renewed_at: float | None, now: float, timing: Timing) -> bool:
    """Whether the holder may still act: its last successful renewal (timed from before the
    request was sent) is younger than the renew deadline."""
    return renewed_at is not None and now - renewed_at < timing.renew_deadline


def next_record(
    identity: str, verdict: Verdict, seen: Observation, timing: Timing, wall_time: str
) -> LeaseRecord:
    """The record to write for ``verdict`` (CREATE, RENEW or TAKE)."""
    duration = max(1, round(timing.lease_duration))
    previous = seen.record or LeaseRecord()
    if verdict is Verdict.RENEW:
        return replace(
            previous,
            duration_seconds=duration,
            renew_time=wall_time,
            acquire_time=previous.acquire_time or wall_time,
        )
    if verdict is Verdict.WAIT:
        raise ValueError("a waiting candidate writes nothing")
    return LeaseRecord(
        holder=identity,
        duration_seconds=duration,
        acquire_time=wall_time,
        renew_time=wall_time,
        transitions=previous.transitions + (0 if seen.record is None else 1),
    )


def released(record: LeaseRecord, wall_time: str) -> LeaseRecord:
    """What a holder writes when it stops (client-go's ReleaseOnCancel): no holder and a 1 s
    duration, so a successor takes over at its next try instead of after a full lease."""
    return replace(record, holder="", duration_seconds=1, renew_time=wall_time)


def lease_object(
    namespace: str, name: str, record: LeaseRecord, resource_version: str | None
) -> dict[str, Any]:
    """The Lease to create (no resourceVersion) or to replace (the one that was read)."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    return {
        "apiVersion": LEASE_API_VERSION,
        "kind": "Lease",
        "metadata": metadata,
        "spec": record.spec(),
    }
