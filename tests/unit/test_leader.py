"""Leader election: the pure decisions on a fake clock, the loop against a fake Lease API that
behaves like the API server (resourceVersion preconditions), the write fence, /healthz."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest

from modeldeploy_operator.__main__ import health_check, parse_args
from modeldeploy_operator.builders.deployment import BuildConfig
from modeldeploy_operator.context import OperatorContext
from modeldeploy_operator.health import HealthServer
from modeldeploy_operator.k8s.client import ApiError, Json
from modeldeploy_operator.k8s.reflector import Contact
from modeldeploy_operator.leader.decide import (
    LeaseRecord,
    Observation,
    Timing,
    Verdict,
    decide,
    next_record,
    observe,
    released,
    still_leading,
)
from modeldeploy_operator.leader.elector import (
    LeaderElector,
    LeaderOnlyApi,
    NotLeading,
    default_namespace,
)
from modeldeploy_operator.reconcile import Reconciler
from modeldeploy_operator.telemetry import Telemetry

TIMING = Timing()
HELD = LeaseRecord(holder="b", duration_seconds=15, renew_time="t0", transitions=3)


# -- the pure decision ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "since", "now", "expected"),
    [
        (None, 0.0, 0.0, Verdict.CREATE),  # no Lease yet
        (LeaseRecord(holder="a", duration_seconds=15), 0.0, 100.0, Verdict.RENEW),  # ours
        (LeaseRecord(holder="", duration_seconds=1), 50.0, 50.0, Verdict.TAKE),  # released
        (HELD, 100.0, 100.0, Verdict.WAIT),  # just seen renewed
        (HELD, 100.0, 114.9, Verdict.WAIT),  # not yet a whole lease since
        (HELD, 100.0, 115.0, Verdict.TAKE),  # a whole lease without a change: expired
    ],
)
def test_who_may_write_the_lease(
    record: LeaseRecord | None, since: float, now: float, expected: Verdict
) -> None:
    assert decide("a", Observation(record, "1", since), now) is expected


def test_expiry_is_timed_from_when_this_candidate_saw_the_record_not_from_the_holders_clock() -> (
    None
):
    first = observe(None, HELD, "7", now=100.0)
    same = observe(first, HELD, "7", now=110.0)
    assert same.since == 100.0  # unchanged: it ages
    assert decide("a", same, 114.0) is Verdict.WAIT
    assert decide("a", same, 115.0) is Verdict.TAKE
    renewed = observe(same, replace(HELD, renew_time="t1"), "8", 114.0)
    assert renewed.since == 114.0  # a renewal starts the clock again
    assert decide("a", renewed, 115.0) is Verdict.WAIT


def test_the_leader_stops_at_the_renew_deadline_before_anybody_may_take_over() -> None:
    assert still_leading(100.0, 109.9, TIMING)
    assert not still_leading(100.0, 110.0, TIMING)
    assert not still_leading(None, 0.0, TIMING)
    assert TIMING.renew_deadline < TIMING.lease_duration


@pytest.mark.parametrize(
    ("lease", "renew", "retry"), [(10, 10, 2), (15, 10, 10), (15, 10, 0), (5, 10, 2)]
)
def test_inconsistent_timings_are_refused(lease: float, renew: float, retry: float) -> None:
    with pytest.raises(ValueError, match="retry period < renew deadline < lease duration"):
        Timing(lease_duration=lease, renew_deadline=renew, retry_period=retry)


def test_records_written_for_each_verdict() -> None:
    taken = next_record("a", Verdict.TAKE, Observation(HELD, "1", 0.0), TIMING, "t9")
    assert taken == LeaseRecord("a", 15, "t9", "t9", 4)  # a new holder: one more transition
    created = next_record("a", Verdict.CREATE, Observation(None, None, 0.0), TIMING, "t9")
    assert created.transitions == 0
    mine = LeaseRecord("a", 15, "t1", "t2", 4)
    renewed = next_record("a", Verdict.RENEW, Observation(mine, "1", 0.0), TIMING, "t9")
    assert renewed == LeaseRecord("a", 15, "t1", "t9", 4)  # acquireTime kept
    assert released(renewed, "t10") == LeaseRecord("", 1, "t1", "t10", 4)
    assert "holderIdentity" not in released(renewed, "t10").spec()
    with pytest.raises(ValueError, match="writes nothing"):
        next_record("a", Verdict.WAIT, Observation(HELD, "1", 0.0), TIMING, "t9")


# -- the loop, against a fake API server ------------------------------------------------------


class FakeLeases:
    """One Lease with resourceVersion preconditions, like the API server."""

    def __init__(self) -> None:
        self.lease: Json | None = None
        self.version = 0
        self.fail: Exception | None = None
        self.writes: list[Json] = []

    def get_lease(self, namespace: str, name: str) -> Json | None:
        if self.fail is not None:
            raise self.fail
        return copy.deepcopy(self.lease)

    def create_lease(self, lease: Mapping[str, Any]) -> Json:
        if self.lease is not None:
            raise ApiError(409, "AlreadyExists", "exists")
        return self._store(lease)

    def replace_lease(self, lease: Mapping[str, Any]) -> Json:
        if self.fail is not None:
            raise self.fail
        assert self.lease is not None
        if lease["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        return self._store(lease)

    def _store(self, lease: Mapping[str, Any]) -> Json:
        self.version += 1
        stored = copy.deepcopy(dict(lease))
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.lease = stored
        self.writes.append(copy.deepcopy(stored))
        return copy.deepcopy(stored)

    @property
    def holder(self) -> str:
        return "" if self.lease is None else LeaseRecord.of(self.lease).holder


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def candidate(leases: FakeLeases, identity: str, clock: Clock) -> LeaderElector:
    return LeaderElector(
        leases,
        lease=("ns", "modeldeploy-operator"),
        identity=identity,
        logger=logging.getLogger("test"),
        clock=clock,
        wall_time=lambda: f"wall-{clock.now}",
    )


def test_one_candidate_leads_the_other_takes_over_a_lease_duration_after_the_last_renewal() -> None:
    leases, clock = FakeLeases(), Clock()
    a, b = candidate(leases, "a", clock), candidate(leases, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    assert (a.leading, b.leading, leases.holder) == (True, False, "a")
    for _ in range(5):  # a renews every retry period; b never gets it
        clock.now += TIMING.retry_period
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew()
    # a dies. b has just seen its last renewal: it takes over one lease duration later.
    clock.now += TIMING.lease_duration - 0.1
    assert not b.try_acquire_or_renew()
    clock.now += 0.1
    assert b.try_acquire_or_renew()
    assert leases.holder == "b"
    assert LeaseRecord.of(leases.lease or {}).transitions == 1
    assert not a.leading  # past its renew deadline long before


def test_two_candidates_racing_for_an_expired_lease_cannot_both_win() -> None:
    leases, clock = FakeLeases(), Clock()
    old = candidate(leases, "old", clock)
    assert old.try_acquire_or_renew()
    a, b = candidate(leases, "a", clock), candidate(leases, "b", clock)
    a.try_acquire_or_renew()
    b.try_acquire_or_renew()
    clock.now += TIMING.lease_duration
    # Both read the expired Lease, then both write: the second write carries a stale
    # resourceVersion and is refused.
    original = leases.get_lease
    reads: list[Json | None] = [original("ns", "x"), original("ns", "x")]
    leases.get_lease = lambda namespace, name: reads.pop(0)  # type: ignore[method-assign]
    results = [a.try_acquire_or_renew(), b.try_acquire_or_renew()]
    assert results == [True, False]
    assert (a.leading, b.leading, leases.holder) == (True, False, "a")


def test_a_leader_that_cannot_renew_stops_at_the_renew_deadline() -> None:
    leases, clock = FakeLeases(), Clock()
    a = candidate(leases, "a", clock)
    assert a.try_acquire_or_renew()
    leases.fail = ApiError(0, "ConnectionFailed", "timed out")
    clock.now += TIMING.renew_deadline - 0.1
    assert a.leading  # the fence is still open just before the deadline
    clock.now += 0.1
    assert not a.leading  # and closes at it, with no request needed


def test_release_hands_the_lease_over_at_once() -> None:
    leases, clock = FakeLeases(), Clock()
    a, b = candidate(leases, "a", clock), candidate(leases, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert not a.leading
    assert leases.holder == ""
    assert (leases.lease or {})["spec"]["leaseDurationSeconds"] == 1
    assert b.try_acquire_or_renew()  # at its next try, not a lease duration later


def test_release_leaves_a_lease_alone_once_it_expired() -> None:
    leases, clock = FakeLeases(), Clock()
    a = candidate(leases, "a", clock)
    assert a.try_acquire_or_renew()
    writes = len(leases.writes)
    clock.now += TIMING.renew_deadline
    a.release()
    assert len(leases.writes) == writes


def test_a_leader_that_finds_somebody_else_holding_the_lease_stops_at_once() -> None:
    leases, clock = FakeLeases(), Clock()
    a = candidate(leases, "a", clock)
    assert a.try_acquire_or_renew()
    assert leases.lease is not None
    leases.lease["spec"]["holderIdentity"] = "intruder"
    assert not a.try_acquire_or_renew()
    assert not a.leading


def test_keep_returns_when_the_lease_is_lost_and_not_when_stopped() -> None:
    leases = FakeLeases()
    timing = Timing(lease_duration=0.6, renew_deadline=0.4, retry_period=0.05)
    a = LeaderElector(
        leases, lease=("ns", "x"), identity="a", logger=logging.getLogger("t"), timing=timing
    )

    async def scenario() -> tuple[bool, bool, float]:
        stop = asyncio.Event()
        assert await a.acquire(stop)
        asyncio.get_running_loop().call_later(0.3, stop.set)
        kept = await asyncio.wait_for(a.keep(stop), timeout=5)  # renews until stopped
        leases.fail = ApiError(0, "ConnectionFailed", "down")
        started = time.monotonic()
        lost = await asyncio.wait_for(a.keep(asyncio.Event()), timeout=5)
        return kept, lost, time.monotonic() - started

    kept, lost, after = asyncio.run(scenario())
    assert (kept, lost) == (False, True)
    assert 0.3 <= after < 1.0  # at the renew deadline, give or take a retry period
    assert not a.leading


# -- the fence --------------------------------------------------------------------------------


class RecordingApi:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self.calls.append(name)


def test_the_fence_passes_reads_and_refuses_writes_once_not_leading() -> None:
    inner = RecordingApi()
    leading = [True]
    api = LeaderOnlyApi(inner, lambda: leading[0])
    md = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x", "namespace": "n"}}
    api.apply(md)
    leading[0] = False
    api.get("v1", "Service", "n", "x")
    api.list("v1", "Service", "n")
    for write in (
        lambda: api.apply(md),
        lambda: api.patch_status("n", "x", {}),
        lambda: api.merge_patch("apps/v1", "Deployment/scale", "n", "x", {}),
        lambda: api.delete("v1", "Service", "n", "x"),
        lambda: api.emit_event(md, "Normal", "Ready", "m"),
    ):
        with pytest.raises(NotLeading):
            write()
    assert inner.calls == ["apply", "get", "list"]


# -- flags, namespace, health -----------------------------------------------------------------


def test_flags_default_to_client_gos_timings_and_refuse_inconsistent_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse_args([])
    assert args.leader_elect is True
    assert args.timing == Timing(15.0, 10.0, 2.0)
    assert args.leader_election_namespace is None
    assert parse_args(["--no-leader-elect"]).leader_elect is False
    custom = parse_args(
        ["--leader-election-lease-duration=4", "--leader-election-renew-deadline=3"]
    )
    assert custom.timing == Timing(4.0, 3.0, 2.0)
    with pytest.raises(SystemExit):
        parse_args(["--leader-election-renew-deadline=20"])
    assert "renew deadline" in capsys.readouterr().err


def test_the_lease_namespace_is_the_pods_own(tmp_path: Any) -> None:
    path = tmp_path / "namespace"
    assert default_namespace(path) == "default"
    path.write_text("modeldeploy-system\n")
    assert default_namespace(path) == "modeldeploy-system"


class StalledReconciler:
    def __init__(
        self, running: tuple[tuple[str, str], float] | None, dead: tuple[str, ...] = ()
    ) -> None:
        self.running = running
        self.dead = list(dead)

    def longest_running(self, now: float) -> tuple[tuple[str, str], float] | None:
        return self.running

    def dead_workers(self) -> list[str]:
        return self.dead


def health(reconciler: StalledReconciler, elector: Any = None, contact: Any = None) -> str | None:
    return health_check(reconciler, elector, [], 300, contact or Contact(), 70)  # type: ignore[arg-type]


def test_health_fails_on_a_stuck_reconcile_only_while_leading() -> None:
    stuck = StalledReconciler((("ns", "resnet50"), 301.0))
    assert health(StalledReconciler(None)) is None
    assert health(StalledReconciler((("ns", "a"), 10.0))) is None
    assert health(stuck) == "the reconcile of ns/resnet50 has run for 301 s"
    standby = candidate(FakeLeases(), "a", Clock())
    assert health(stuck, standby) is None


def test_health_fails_when_a_worker_thread_died() -> None:
    dead = StalledReconciler(None, ("reconcile-2",))
    assert health(dead) == "the worker thread reconcile-2 ended"


def test_health_fails_while_a_watch_has_heard_nothing_past_the_inactivity_timeout() -> None:
    now = [0.0]
    contact = Contact(clock=lambda: now[0])
    contact.heard("Deployment")
    contact.heard("Pod")
    now[0] = 70.0
    assert health(StalledReconciler(None), contact=contact) is None
    contact.heard("Pod")
    now[0] = 95.0
    problem = health(StalledReconciler(None), contact=contact)
    assert problem == "the Deployment watch has heard nothing from the API server for 95 s"
    contact.heard("Deployment")  # a list or an event: healthy again
    assert health(StalledReconciler(None), contact=contact) is None


def test_the_reconciler_knows_how_long_its_running_reconciles_have_run() -> None:
    entered, release = threading.Event(), threading.Event()

    class SlowApi:
        def get(self, *args: Any) -> None:  # the ModelDeployment is gone, after a while
            entered.set()
            release.wait(5)

    ctx = OperatorContext(
        api=SlowApi(),  # type: ignore[arg-type]
        build=BuildConfig(runtime_image="x"),
        telemetry=Telemetry(),
        gpus=None,  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
    )
    reconciler = Reconciler(ctx, workers=2)
    assert reconciler.longest_running(time.monotonic()) is None
    reconciler.start()
    reconciler.add("ns", "resnet50")
    assert entered.wait(5)
    key, seconds = reconciler.longest_running(time.monotonic() + 400) or (None, 0.0)
    assert key == ("ns", "resnet50")
    assert seconds >= 400
    release.set()
    assert reconciler.stop(5)
    assert reconciler.longest_running(time.monotonic()) is None


def test_the_health_endpoint_answers_the_checks_verdict() -> None:
    problem: list[str | None] = [None]
    server = HealthServer("127.0.0.1", 0, lambda: problem[0])
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert (response.status, response.read()) == (200, b"ok\n")
        problem[0] = "the reconcile of ns/x has run for 400 s"
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(url, timeout=5)
        assert failed.value.code == 500
        assert b"ns/x" in failed.value.read()
    finally:
        server.stop()
