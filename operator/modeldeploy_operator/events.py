"""Which Event writes to make: client-go's event correlator, as a decision over what was
already posted.

A condition that flaps, or a child something keeps deleting, must not flood the namespace
with Events: an Event like one posted in the last ``window`` seconds (the same object, type,
reason and message) becomes a patch of that Event's ``count`` and ``lastTimestamp``, as
``kubectl describe`` shows "(x20 over 3m)". And each object may make at most ``burst``
writes, refilled at one per ``refill`` seconds (client-go's spam filter: 25, then one per
five minutes); beyond that Events are dropped and counted. Status always tells the truth;
Events are the log of it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

WINDOW_SECONDS = 600.0  # client-go's aggregation window
BURST = 25  # client-go's spam filter: 25 Events per object at once...
REFILL_SECONDS = 300.0  # ...then one every five minutes
MAX_REMEMBERED = 4096  # Events remembered for aggregation, least recently seen out first

Similar = tuple[str, str, str, str]  # (object id, type, reason, message)


@dataclass(frozen=True)
class EventWrite:
    """Create a new Event (``name`` None), or patch ``name`` to ``count``."""

    name: str | None
    count: int


@dataclass
class _Posted:
    name: str | None  # None until the create's answer names it
    count: int
    last: float


@dataclass
class _Bucket:
    tokens: float
    at: float


class EventCorrelator:
    """Remembers the Events posted; thread-safe (workers post concurrently)."""

    def __init__(
        self,
        window: float = WINDOW_SECONDS,
        burst: int = BURST,
        refill: float = REFILL_SECONDS,
        remembered: int = MAX_REMEMBERED,
    ) -> None:
        self._window, self._burst, self._refill = window, burst, refill
        self._remembered = remembered
        self._lock = threading.Lock()
        self._posted: OrderedDict[Similar, _Posted] = OrderedDict()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def decide(self, similar: Similar, now: float) -> EventWrite | None:
        """The write for this Event, or None to drop it (the object's budget is spent)."""
        with self._lock:
            if not self._take(similar[0], now):
                return None
            posted = self._posted.pop(similar, None)
            if posted is not None and posted.name and now - posted.last <= self._window:
                posted.count += 1
                posted.last = now
                self._posted[similar] = posted
                return EventWrite(posted.name, posted.count)
            self._posted[similar] = _Posted(None, 1, now)
            while len(self._posted) > self._remembered:
                self._posted.popitem(last=False)
            return EventWrite(None, 1)

    def created(self, similar: Similar, name: str) -> None:
        """The Event the last decision created is called ``name``: similar ones patch it."""
        with self._lock:
            posted = self._posted.get(similar)
            if posted is not None and posted.name is None:
                posted.name = name

    def gone(self, similar: Similar) -> None:
        """The Event to patch is gone (Events expire after an hour): the write this decision
        allowed posts a new one instead, which :meth:`created` then names."""
        with self._lock:
            posted = self._posted.get(similar)
            if posted is not None:
                posted.name, posted.count = None, 1

    def forget(self, prefix: str) -> None:
        """The objects whose ids start with ``prefix`` were deleted."""
        with self._lock:
            for key in [k for k in self._posted if k[0].startswith(prefix)]:
                del self._posted[key]
            for uid in [u for u in self._buckets if u.startswith(prefix)]:
                del self._buckets[uid]

    def _take(self, uid: str, now: float) -> bool:
        bucket = self._buckets.pop(uid, None) or _Bucket(float(self._burst), now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) / self._refill)
        bucket.at = now
        self._buckets[uid] = bucket
        while len(self._buckets) > self._remembered:
            self._buckets.popitem(last=False)
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True
