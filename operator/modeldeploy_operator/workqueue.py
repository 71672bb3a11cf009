"""A rate-limited, delaying work queue of object keys, and the worker threads that drain it.

After client-go's ``util/workqueue`` and controller-runtime's reconciler loop:

- **The queue** (client-go's ``Type``) holds keys in order, a *dirty* set (keys that need a
  pass) and a *processing* set (keys a worker holds). ``add`` of a key already dirty does
  nothing (duplicate adds coalesce); ``add`` of a key being processed marks it dirty only, and
  ``done`` puts it back in line once: a key is never processed by two workers at once, and a
  change that arrives during a pass gets exactly one more pass after it.
- **Two lanes.** ``add(key, urgent=True)`` puts a key ahead of the others: a spec nobody has
  reconciled yet, or a manual command, is not stuck behind a storm of pod and status events
  (a cold start of 1,000 objects writes every first status before any follow-up pass).
  controller-runtime's priority queue orders the same way the other way round: it demotes
  the initial listing below live changes.
- **Delays** (client-go's delaying queue): ``add_after`` keeps the earliest wake-up per key and
  adds the key when it comes. A key waiting for its time is not dirty yet, so an event can
  still run it earlier.
- **Failures** (client-go's ``ItemExponentialFailureRateLimiter``, the per-item half of
  ``DefaultControllerRateLimiter``): ``add_rate_limited`` waits 5 ms, 10 ms, 20 ms, ...
  doubling per failure of that key, capped at 5 minutes; ``forget`` after a success starts
  the next failure at 5 ms again.
- **Workers** (controller-runtime's ``processNextWorkItem``): N threads ``get`` a key, run the
  handler, and call ``done``; the handler decides ``forget``, ``add_after`` or
  ``add_rate_limited``. ``shut_down`` makes ``get`` return None: each worker finishes the key
  it holds and ends.

**Threads, not asyncio.** Reconcile is synchronous and blocks on the API server and on
Prometheus, so it runs in threads whatever the queue is made of. An asyncio queue would hop to
the event loop for every add (kopf's handlers, the resync, workers re-adding) and back to a
thread for every pass, and tie each test to a loop. A ``threading.Condition`` makes ``add`` a
short critical section callable from any thread or from the loop itself, and workers block in
``get`` without polling. There is no timer thread either: ``get`` moves the keys whose time
has come into line and otherwise sleeps until the earliest one is due or an add wakes it.

**The clock is injected** (:class:`Clock`: ``monotonic()`` and ``wait(condition, timeout)``),
so backoff, delays and wait times are tested on a fake clock that only moves when a test says.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)

BASE_DELAY = 0.005  # seconds: the first retry after a failure (client-go's 5 ms)
MAX_DELAY = 300.0  # seconds: no key waits longer than this for its retry


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        """Wait on ``condition`` (held by the caller) until it is notified or ``timeout``
        seconds of this clock have passed (None: until notified). May return early."""
        ...


class RealClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, condition: threading.Condition, timeout: float | None) -> None:
        condition.wait(timeout)


class ExponentialBackoff(Generic[K]):
    """Per-key failure delays: ``base * 2**failures``, capped at ``cap``. Not thread-safe on
    its own: the queue calls it under its lock."""

    def __init__(self, base: float = BASE_DELAY, cap: float = MAX_DELAY) -> None:
        self.base = base
        self.cap = cap
        self._failures: dict[K, int] = {}

    def when(self, key: K) -> float:
        """The delay before this failure's retry; counts the failure."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        if failures >= 64:  # 2**64 * base is far past any cap; keep the float finite
            return self.cap
        return float(min(self.base * 2**failures, self.cap))

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)


class WorkQueue(Generic[K]):
    """client-go's rate-limited delaying work queue; see the module's docstring."""

    def __init__(
        self,
        clock: Clock | None = None,
        backoff: ExponentialBackoff[K] | None = None,
        *,
        on_wait: Callable[[float], None] | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self._clock: Clock = clock or RealClock()
        self._backoff: ExponentialBackoff[K] = backoff or ExponentialBackoff()
        self._on_wait = on_wait  # seconds from the add to the get, per pass
        self._on_retry = on_retry  # one per add_rate_limited
        self._cond = threading.Condition()
        self._line: deque[K] = deque()  # dirty and not processing, in order (may hold stale keys)
        self._urgent: deque[K] = deque()  # the same, ahead of the line
        self._urgent_keys: set[K] = set()  # keys whose next pass is urgent
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._added_at: dict[K, float] = {}
        self._waiting: dict[K, float] = {}  # key -> when it is due (the earliest asked for)
        self._due: list[tuple[float, int, K]] = []  # heap; entries not in _waiting are stale
        self._sequence = 0  # ties in the heap never compare keys
        self._shutting_down = False

    # -- adding ------------------------------------------------------------------------------

    def add(self, key: K, *, urgent: bool = False) -> None:
        """Mark ``key`` as needing a pass; ``urgent`` ahead of the others. Cheap and
        non-blocking (one short lock)."""
        with self._cond:
            self._add(key, self._clock.monotonic(), urgent=urgent)

    def add_after(self, key: K, seconds: float) -> None:
        """Add ``key`` once ``seconds`` have passed; an earlier wake-up already asked for
        wins."""
        with self._cond:
            self._add_after(key, seconds)

    def add_rate_limited(self, key: K) -> float:
        """Add ``key`` after its backoff (after a failure); returns the delay chosen."""
        with self._cond:
            delay = self._backoff.when(key)
            self._add_after(key, delay)
        if self._on_retry is not None:
            self._on_retry()
        return delay

    def forget(self, key: K) -> None:
        """``key`` succeeded (or is gone): its next failure starts at the base delay again."""
        with self._cond:
            self._backoff.forget(key)

    def discard(self, key: K) -> None:
        """``key``'s object was deleted: forget its backoff and cancel its scheduled pass (a
        step's or an analysis's time, a retry), as deletion stops a timer. A pass already in
        line or running goes ahead and finds the object gone."""
        with self._cond:
            self._backoff.forget(key)
            self._waiting.pop(key, None)  # its heap entry is stale from now on

    def failures(self, key: K) -> int:
        """Failures of ``key`` since it was last forgotten (client-go's NumRequeues)."""
        with self._cond:
            return self._backoff.failures(key)

    # -- working -----------------------------------------------------------------------------

    def get(self) -> K | None:
        """Block until a key is ready and hand it out (the caller must call ``done``), or
        return None once the queue shuts down."""
        with self._cond:
            while True:
                if self._shutting_down:
                    return None
                now = self._clock.monotonic()
                self._promote(now)
                key = self._next()
                if key is not None:
                    self._dirty.discard(key)
                    self._urgent_keys.discard(key)
                    self._processing.add(key)
                    waited = max(now - self._added_at.pop(key, now), 0.0)
                    break
                timeout = (self._due[0][0] - now) if self._due else None
                self._clock.wait(self._cond, timeout)
        if self._on_wait is not None:  # outside the lock: a metric has locks of its own
            self._on_wait(waited)
        return key

    def done(self, key: K) -> None:
        """The pass over ``key`` ended; if it was added meanwhile, it gets one more."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                (self._urgent if key in self._urgent_keys else self._line).append(key)
                self._cond.notify()

    def shut_down(self) -> None:
        """Stop handing keys out: every ``get`` returns None; adds are ignored from now on."""
        with self._cond:
            self._shutting_down = True
            self._cond.notify_all()

    @property
    def shutting_down(self) -> bool:
        with self._cond:
            return self._shutting_down

    def depth(self) -> int:
        """Keys ready and waiting for a worker (client-go's ``workqueue_depth``), counting
        the delayed ones whose time has come."""
        with self._cond:
            if not self._shutting_down:
                self._promote(self._clock.monotonic())
            return len(self._dirty - self._processing)

    def delayed(self) -> int:
        """Keys waiting for their time (a requeue-after or a retry)."""
        with self._cond:
            return len(self._waiting)

    # -- under the lock ----------------------------------------------------------------------

    def _next(self) -> K | None:
        """The next key in line, urgent ones first; entries already handed out are skipped."""
        for lane in (self._urgent, self._line):
            while lane:
                key = lane.popleft()
                if key in self._dirty and key not in self._processing:
                    return key
        return None

    def _add(self, key: K, now: float, *, urgent: bool = False) -> None:
        if self._shutting_down:
            return
        if key in self._dirty:
            if urgent and key not in self._urgent_keys:  # already in line: move it ahead
                self._urgent_keys.add(key)
                if key not in self._processing:
                    self._urgent.append(key)
                    self._cond.notify()
            return
        self._dirty.add(key)
        self._added_at[key] = now
        if urgent:
            self._urgent_keys.add(key)
        if key in self._processing:
            return  # done() puts it in line
        (self._urgent if urgent else self._line).append(key)
        self._cond.notify()

    def _add_after(self, key: K, seconds: float) -> None:
        if self._shutting_down:
            return
        now = self._clock.monotonic()
        if seconds <= 0:
            self._add(key, now)
            return
        due = now + seconds
        known = self._waiting.get(key)
        if known is not None and known <= due:
            return
        self._waiting[key] = due
        self._sequence += 1
        heapq.heappush(self._due, (due, self._sequence, key))
        self._cond.notify()  # a worker sleeping until a later wake-up must look again

    def _promote(self, now: float) -> None:
        """Move the keys whose time has come into line."""
        while self._due and self._due[0][0] <= now:
            due, _, key = heapq.heappop(self._due)
            if self._waiting.get(key) == due:
                del self._waiting[key]
                self._add(key, due)  # waiting in line counts from when it was due


class Workers(Generic[K]):
    """N threads that take keys from a queue and run ``handle`` on each, one key per thread
    at a time. ``handle`` decides what the queue does next (forget, add_after,
    add_rate_limited); an exception it lets through is logged and retried with backoff."""

    def __init__(
        self,
        queue: WorkQueue[K],
        handle: Callable[[K], object],
        count: int,
        logger: logging.Logger,
        clock: Clock | None = None,
        name: str = "worker",
    ) -> None:
        if count < 1:
            raise ValueError(f"need at least one worker, got {count}")
        self._queue = queue
        self._handle = handle
        self._logger = logger
        self._clock: Clock = clock or RealClock()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(count)
        ]
        self._lock = threading.Lock()
        self._started: dict[K, float] = {}  # keys being handled, since when (monotonic)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float) -> bool:
        """Shut the queue down and wait up to ``timeout`` seconds (real ones) for every worker
        to finish its key; False when some still run (they are daemon threads)."""
        self._queue.shut_down()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(thread.is_alive() for thread in self._threads)

    def dead(self) -> list[str]:
        """Workers that ended although the queue still runs: their share of work is lost."""
        if self._queue.shutting_down:
            return []
        return [t.name for t in self._threads if t.ident is not None and not t.is_alive()]

    def longest_running(self, now: float) -> tuple[K, float] | None:
        """The key handled longest and for how many seconds (``now`` from the clock); None
        when every worker is idle."""
        with self._lock:
            if not self._started:
                return None
            key, since = min(self._started.items(), key=lambda item: item[1])
        return key, now - since

    def _work(self) -> None:
        while (key := self._queue.get()) is not None:
            with self._lock:
                self._started[key] = self._clock.monotonic()
            try:
                self._handle(key)
            except Exception:
                delay = self._queue.add_rate_limited(key)
                self._logger.exception(f"Handling {key} failed; retrying in {delay:g} s")
            finally:
                with self._lock:
                    self._started.pop(key, None)
                self._queue.done(key)
