"""The work queue (client-go's rules) and the reconciler's workers, on a fake clock: backoff,
delays and wait times move only when a test advances the clock; threads meet on events."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from modeldeploy_operator import reconcile as reconcile_module
from modeldeploy_operator.builders.deployment import BuildConfig
from modeldeploy_operator.context import OperatorContext
from modeldeploy_operator.k8s.client import ApiError
from modeldeploy_operator.reconcile import Outcome, Reconciler
from modeldeploy_operator.telemetry import Telemetry
from modeldeploy_operator.workqueue import ExponentialBackoff, Workers, WorkQueue

LOG = logging.getLogger("test")
PATIENCE = 10.0  # real seconds a test waits for another thread before it fails


class FakeClock:
    """Time moves only on ``advance``, which wakes everyone waiting on this clock."""

    def __init__(self, now: float = 1000.0) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._conditions: set[threading.Condition] = set()

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            return
        with self._lock:
            self._conditions.add(condition)
        condition.wait()  # until an add, a done, a shutdown or an advance notifies

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            conditions = list(self._conditions)
        for condition in conditions:
            with condition:
                condition.notify_all()


def eventually(what: str, check: Callable[[], bool]) -> None:
    """Wait (real time, for other threads) until ``check`` holds."""
    deadline = time.monotonic() + PATIENCE
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def take(queue: WorkQueue[str]) -> str:
    """``get`` for a test that knows a key is ready (never blocks)."""
    assert queue.depth() > 0, "nothing is ready"
    key = queue.get()
    assert key is not None
    return key


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_doubles_from_5_ms_and_stops_at_5_minutes() -> None:
    backoff: ExponentialBackoff[str] = ExponentialBackoff()
    delays = [backoff.when("a") for _ in range(20)]
    assert delays[:5] == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.08])
    assert delays[15] == pytest.approx(0.005 * 2**15)  # 163.84 s
    assert delays[16:] == [300.0] * 4  # 327.68 s would be over the cap
    assert backoff.failures("a") == 20
    assert backoff.when("b") == pytest.approx(0.005)  # per key
    backoff.forget("a")
    assert backoff.when("a") == pytest.approx(0.005)
    for _ in range(2000):  # no overflow after very many failures
        assert backoff.when("c") <= 300.0


def test_a_failing_key_comes_back_after_each_backoff_on_the_clock(clock: FakeClock) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)
    expected = [0.005 * 2**n for n in range(16)] + [300.0, 300.0]
    for delay in expected:
        assert queue.add_rate_limited("a") == pytest.approx(delay)
        clock.advance(delay * 0.999)
        assert queue.depth() == 0, f"due only after {delay} s"
        clock.advance(delay * 0.001 + 1e-9)
        assert take(queue) == "a"
        queue.done("a")
    assert queue.failures("a") == len(expected)
    queue.forget("a")  # a success
    assert queue.failures("a") == 0
    assert queue.add_rate_limited("a") == pytest.approx(0.005)


# -- the queue's guarantees --------------------------------------------------------------------


def test_duplicate_adds_coalesce_and_keep_their_first_place(clock: FakeClock) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)
    for key in ("a", "b", "a", "c", "b", "a"):
        queue.add(key)
    assert queue.depth() == 3
    assert [take(queue) for _ in range(3)] == ["a", "b", "c"]


def test_urgent_keys_go_ahead_and_an_urgent_add_moves_a_waiting_key(clock: FakeClock) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)
    for key in ("pod-event-1", "pod-event-2", "status-event"):
        queue.add(key)
    queue.add("new-spec", urgent=True)
    queue.add("status-event", urgent=True)  # waiting already: it moves ahead, once
    order = [take(queue) for _ in range(4)]
    assert order == ["new-spec", "status-event", "pod-event-1", "pod-event-2"]
    assert queue.depth() == 0
    for key in order:
        queue.done(key)
    queue.add("pod-event-1")
    assert queue.depth() == 1  # the stale entries left in line are not counted


def test_an_urgent_add_during_a_pass_runs_it_first_after_done(clock: FakeClock) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)
    queue.add("a")
    assert take(queue) == "a"
    queue.add("b")
    queue.add("a", urgent=True)  # a new spec arrived while "a" was being reconciled
    queue.done("a")
    assert [take(queue), take(queue)] == ["a", "b"]


def test_a_key_added_while_processed_runs_once_more_after_done(clock: FakeClock) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)
    queue.add("a")
    assert take(queue) == "a"
    for _ in range(5):
        queue.add("a")  # events during the pass
    assert queue.depth() == 0  # not handed out twice at once
    queue.done("a")
    assert take(queue) == "a"  # once more
    queue.done("a")
    assert queue.depth() == 0


def test_add_after_wakes_keys_in_time_order_and_the_earliest_request_wins(
    clock: FakeClock,
) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)
    queue.add_after("a", 3.0)
    queue.add_after("b", 1.0)
    queue.add_after("c", 2.0)
    queue.add_after("d", 10.0)
    queue.add_after("d", 0.5)  # sooner: wins
    queue.add_after("b", 5.0)  # later: ignored
    assert queue.delayed() == 4
    clock.advance(0.49)
    assert queue.depth() == 0
    clock.advance(0.01)
    assert take(queue) == "d"
    clock.advance(2.5)  # now 3.0: b, c and a are all due, in that order
    assert [take(queue) for _ in range(3)] == ["b", "c", "a"]
    clock.advance(20)
    assert queue.depth() == 0  # d's stale 10 s request is gone
    queue.add_after("e", 0)
    queue.add_after("f", -1)
    assert [take(queue) for _ in range(2)] == ["e", "f"]  # no delay: at once


def test_a_delayed_key_can_still_run_earlier_and_is_not_lost(clock: FakeClock) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)
    queue.add_after("a", 60.0)  # requeue-after of a canary analysis
    queue.add("a")  # an event now
    assert take(queue) == "a"
    queue.done("a")
    clock.advance(60.0)
    assert take(queue) == "a"  # the timed pass still comes


def test_a_discarded_key_loses_its_scheduled_pass_and_its_backoff(clock: FakeClock) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)
    queue.add_after("deleted", 600.0)  # a step's time
    queue.add_after("kept", 600.0)
    queue.add_rate_limited("retried")
    queue.add_rate_limited("retried")
    assert queue.failures("retried") == 2
    queue.discard("deleted")
    queue.discard("retried")
    assert queue.delayed() == 1
    assert queue.failures("retried") == 0
    clock.advance(600.0)
    assert take(queue) == "kept"
    assert queue.depth() == 0  # nothing of the discarded keys comes back
    queue.add_after("deleted", 1.0)  # created again: scheduled as any new key
    clock.advance(1.0)
    assert take(queue) == "deleted"


def test_wait_time_counts_from_the_add_or_from_when_the_key_was_due(clock: FakeClock) -> None:
    waits: list[float] = []
    retries: list[None] = []
    queue: WorkQueue[str] = WorkQueue(
        clock, on_wait=waits.append, on_retry=lambda: retries.append(None)
    )
    queue.add("a")
    clock.advance(2.0)
    take(queue)
    queue.add_after("b", 5.0)
    clock.advance(7.0)
    take(queue)
    queue.add_rate_limited("c")
    assert waits == [2.0, 2.0]
    assert len(retries) == 1


def test_a_worker_waiting_in_get_wakes_when_a_delay_ends(clock: FakeClock) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)
    got: list[str | None] = []
    worker = threading.Thread(target=lambda: got.append(queue.get()))
    worker.start()
    queue.add_after("a", 30.0)
    clock.advance(29.0)
    worker.join(0.05)
    assert worker.is_alive()  # not due yet
    clock.advance(1.0)
    worker.join(PATIENCE)
    assert got == ["a"]


def test_shutdown_ends_get_and_ignores_adds(clock: FakeClock) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)
    got: list[str | None] = ["not yet"]
    worker = threading.Thread(target=lambda: got.__setitem__(0, queue.get()))
    worker.start()
    queue.shut_down()
    worker.join(PATIENCE)
    assert got == [None]
    queue.add("a")
    queue.add_after("b", 1.0)
    assert queue.get() is None
    assert (queue.depth(), queue.delayed()) == (0, 0)


# -- workers ----------------------------------------------------------------------------------


def test_workers_never_hold_one_key_twice_and_every_add_is_followed_by_a_pass(
    clock: FakeClock,
) -> None:
    """Eight threads add 2000 times to five keys while four workers drain them."""
    queue: WorkQueue[str] = WorkQueue(clock)
    lock = threading.Lock()
    held: set[str] = set()
    overlaps: list[str] = []
    passes: Counter[str] = Counter()
    last_add: dict[str, int] = {}
    last_start: dict[str, int] = {}
    tick = iter(range(10**9))

    def handle(key: str) -> None:
        with lock:
            if key in held:
                overlaps.append(key)
            held.add(key)
            last_start[key] = next(tick)
        time.sleep(0)  # let the others run
        with lock:
            held.discard(key)
            passes[key] += 1

    def producer(seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311 - a test's mix of keys
        for _ in range(250):
            key = rng.choice("abcde")
            with lock:
                last_add[key] = next(tick)
            queue.add(key)

    workers = Workers(queue, handle, 4, LOG, clock)
    workers.start()
    producers = [threading.Thread(target=producer, args=(i,)) for i in range(8)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join(PATIENCE)
    eventually(
        "the queue to drain",
        lambda: queue.depth() == 0 and workers.longest_running(clock.monotonic()) is None,
    )
    assert workers.stop(PATIENCE)
    assert overlaps == []
    assert set(passes) == set("abcde")
    assert sum(passes.values()) < 2000  # adds coalesced
    for key, added in last_add.items():  # no add went unanswered
        assert last_start[key] > added, key


def test_workers_run_other_keys_while_one_is_stuck_and_it_runs_again_once(
    clock: FakeClock,
) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)
    entered, release = threading.Event(), threading.Event()
    passes: list[str] = []

    def handle(key: str) -> None:
        passes.append(key)
        if key == "slow" and len(passes) == 1:
            entered.set()
            assert release.wait(PATIENCE)

    workers = Workers(queue, handle, 2, LOG, clock)
    workers.start()
    queue.add("slow")
    assert entered.wait(PATIENCE)
    for _ in range(3):
        queue.add("slow")  # dirty while held: the idle worker must not take it
        queue.add("fast")
    eventually("fast to run", lambda: "fast" in passes)
    assert passes.count("slow") == 1
    clock.advance(40)
    running = workers.longest_running(clock.monotonic())
    assert running == ("slow", 40.0)
    release.set()
    eventually("slow to run once more", lambda: passes.count("slow") == 2)
    eventually("the queue to drain", lambda: workers.longest_running(0) is None)
    assert workers.stop(PATIENCE)
    assert passes.count("slow") == 2


def test_stop_lets_each_worker_finish_its_key_and_take_no_other(clock: FakeClock) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)
    entered, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def handle(key: str) -> None:
        entered.set()
        assert release.wait(PATIENCE)
        finished.append(key)

    workers = Workers(queue, handle, 1, LOG, clock)
    workers.start()
    queue.add("a")
    assert entered.wait(PATIENCE)
    queue.add("b")
    stopped: list[bool] = []
    stopper = threading.Thread(target=lambda: stopped.append(workers.stop(PATIENCE)))
    stopper.start()
    eventually("the queue to shut down", lambda: queue.shutting_down)
    release.set()
    stopper.join(PATIENCE)
    assert stopped == [True]
    assert finished == ["a"]  # finished its key, did not start b
    assert workers.dead() == []  # stopped, not dead


def test_a_handler_exception_is_retried_with_backoff(clock: FakeClock) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)
    passes: list[str] = []

    def handle(key: str) -> None:
        passes.append(key)
        if len(passes) == 1:
            raise ValueError("boom")

    workers = Workers(queue, handle, 1, LOG, clock)
    workers.start()
    queue.add("a")
    eventually("the retry to be scheduled", lambda: queue.delayed() == 1)
    assert passes == ["a"]
    clock.advance(0.005)
    eventually("the retry", lambda: len(passes) == 2)
    assert workers.stop(PATIENCE)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_thread_that_died_is_reported(clock: FakeClock) -> None:
    queue: WorkQueue[str] = WorkQueue(clock)

    def handle(key: str) -> None:
        raise SystemExit  # not an Exception: it ends the thread

    workers = Workers(queue, handle, 2, LOG, clock, name="reconcile")
    workers.start()
    assert workers.dead() == []
    queue.add("a")
    eventually("a worker to die", lambda: len(workers.dead()) == 1)
    assert workers.dead()[0].startswith("reconcile-")
    workers.stop(PATIENCE)
    assert workers.dead() == []  # stopping is not dying


# -- the reconciler: what the queue does after a pass -------------------------------------------


class FakeApi:
    def __init__(self, answer: Callable[[], Mapping[str, Any] | None]) -> None:
        self.answer = answer

    def get(self, *_: Any) -> Mapping[str, Any] | None:
        return self.answer()


def body() -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "a"}}


@pytest.fixture
def make_reconciler(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Reconciler]]:
    made: list[Reconciler] = []

    def make(
        answer: Callable[[], Mapping[str, Any] | None] = body,
        outcome: Callable[[], Outcome] = lambda: Outcome(phase="Available"),
    ) -> Reconciler:
        monkeypatch.setattr(reconcile_module, "reconcile", lambda *_: outcome())
        ctx = OperatorContext(
            api=FakeApi(answer),  # type: ignore[arg-type]
            build=BuildConfig(runtime_image="x"),
            telemetry=Telemetry(),
            gpus=None,  # type: ignore[arg-type]
            logger=LOG,
        )
        reconciler = Reconciler(ctx, workers=2, budget_seconds=30, clock=clock)
        made.append(reconciler)
        return reconciler

    yield make
    for reconciler in made:
        reconciler.stop(PATIENCE)


def sample(reconciler: Reconciler, name: str, **labels: str) -> float:
    value = reconciler.ctx.telemetry.registry.get_sample_value(name, labels or None)
    return value or 0.0


KEY = ("ns", "a")


def test_success_forgets_the_backoff_and_requeues_after_what_it_asked(
    clock: FakeClock, make_reconciler: Callable[..., Reconciler]
) -> None:
    reconciler = make_reconciler(outcome=lambda: Outcome(phase="Progressing", requeue_after=30))
    reconciler.queue.add_rate_limited(KEY)
    reconciler.queue.add_rate_limited(KEY)
    clock.advance(1)
    assert reconciler.queue.get() == KEY  # the retry (the earliest wake-up asked for)
    reconciler.handle(KEY)
    reconciler.queue.done(KEY)
    assert reconciler.queue.failures(KEY) == 0
    clock.advance(29.9)
    assert reconciler.queue.depth() == 0
    clock.advance(0.1)
    assert reconciler.queue.depth() == 1  # the requeue-after


def test_a_requeue_after_behind_an_earlier_wake_up_is_asked_again_by_that_pass(
    clock: FakeClock, make_reconciler: Callable[..., Reconciler]
) -> None:
    """One wake-up per key, the earliest (client-go's rule): the pass it brings is level-based
    and asks for the later one again."""
    reconciler = make_reconciler(outcome=lambda: Outcome(phase="Progressing", requeue_after=30))
    reconciler.queue.add_after(KEY, 5)  # say, a retry
    reconciler.handle(KEY)  # asks for 30 s: the 5 s wake-up stays
    clock.advance(5)
    assert reconciler.queue.get() == KEY
    reconciler.handle(KEY)
    reconciler.queue.done(KEY)
    clock.advance(30)
    assert reconciler.queue.depth() == 1


def test_a_conflict_goes_again_at_once_without_backoff(
    make_reconciler: Callable[..., Reconciler],
) -> None:
    def conflict() -> Outcome:
        raise ApiError(409, "Conflict", "the object has been modified")

    reconciler = make_reconciler(outcome=conflict)
    reconciler.handle(KEY)
    assert reconciler.queue.depth() == 1
    assert reconciler.queue.failures(KEY) == 0
    assert sample(reconciler, "modeldeploy_reconcile_duration_seconds_count", result="conflict")


def test_errors_are_retried_with_growing_backoff_and_counted(
    clock: FakeClock, make_reconciler: Callable[..., Reconciler]
) -> None:
    errors: list[Exception] = [ApiError(500, "InternalError", "etcd"), KeyError("spec")]

    def failing() -> Outcome:
        raise errors.pop(0)

    reconciler = make_reconciler(outcome=failing)
    reconciler.handle(KEY)
    reconciler.handle(KEY)
    assert reconciler.queue.failures(KEY) == 2
    assert reconciler.queue.depth() == 0
    clock.advance(0.005)
    assert reconciler.queue.depth() == 1  # the first retry; the second waits 10 ms
    assert sample(reconciler, "modeldeploy_reconcile_errors_total", reason="api_500") == 1
    assert sample(reconciler, "modeldeploy_reconcile_errors_total", reason="unexpected") == 1
    assert sample(reconciler, "modeldeploy_operator_workqueue_retries_total") == 2


def test_a_deleted_object_is_forgotten(make_reconciler: Callable[..., Reconciler]) -> None:
    reconciler = make_reconciler(answer=lambda: None)
    reconciler.queue.add_rate_limited(KEY)
    reconciler.ctx.apply_errors[KEY] = "refused"
    reconciler.ctx.telemetry.phases.set(KEY, "Degraded")
    assert reconciler.handle(KEY) is None
    assert reconciler.queue.failures(KEY) == 0
    assert KEY not in reconciler.ctx.apply_errors
    assert sample(reconciler, "modeldeploy_modeldeployments", phase="Degraded") == 0


def test_a_pass_over_its_budget_is_counted(
    clock: FakeClock, make_reconciler: Callable[..., Reconciler], caplog: pytest.LogCaptureFixture
) -> None:
    def slow() -> Outcome:
        clock.advance(31)
        return Outcome(phase="Progressing")

    reconciler = make_reconciler(outcome=slow)
    reconciler.handle(KEY)
    assert sample(reconciler, "modeldeploy_operator_reconcile_over_budget_total") == 1
    assert "over its budget of 30 s" in caplog.text
    reconciler = make_reconciler()
    reconciler.handle(KEY)
    assert sample(reconciler, "modeldeploy_operator_reconcile_over_budget_total") == 0


def test_the_reconciler_workers_take_added_keys_and_report_depth(
    make_reconciler: Callable[..., Reconciler],
) -> None:
    reconciler = make_reconciler()
    reconciler.add("ns", "a")
    reconciler.add("ns", "b")
    assert sample(reconciler, "modeldeploy_operator_workqueue_depth") == 2
    reconciler.start()
    eventually(
        "both reconciled",
        lambda: (
            sample(reconciler, "modeldeploy_reconcile_duration_seconds_count", result="success")
            == 2
        ),
    )
    assert sample(reconciler, "modeldeploy_operator_workqueue_depth") == 0
    assert sample(reconciler, "modeldeploy_operator_workqueue_queue_wait_seconds_count") == 2
    assert reconciler.stop(PATIENCE)
    assert reconciler.dead_workers() == []
