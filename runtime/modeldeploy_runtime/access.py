"""Access control for the prediction API: API keys, per-client rate limits, per-client counts.

All optional and off by default. Keys come from a mounted Secret (``--api-keys-dir``): every
non-empty line of every file is an accepted key, re-read when the files change, so rotating
the Secret needs no restart. Clients send ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``. A client is its key (as a salted hash) when keys are on, else its address.

Label values stay bounded without letting strangers crowd out real clients: with keys on,
only a valid key earns a ``client`` label of its own (a wrong key counts as ``unknown``);
the first ``limit`` clients keep theirs, later ones share ``other``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from modeldeploy_runtime.http1 import ProtocolError

Clock = Callable[[], float]


class ClientCounter(Protocol):
    """What access control counts into: RuntimeMetrics.client_requests."""

    client_requests: Any


UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")
UNKNOWN = "unknown"


def client_id(key: str, salt: bytes = b"") -> str:
    """A stable, non-reversible name for a key, safe as a metric label: an HMAC keyed by the
    installation's salt, so the same key has unrelated names in different installations and
    a table of hashed guesses is useless without the salt."""
    return "key-" + hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()[:16]


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip().decode(errors="replace")
        if name == b"x-api-key":
            return value.strip().decode(errors="replace")
    return None


class ApiKeys:
    """The accepted keys, re-read at most every ``refresh`` seconds when files changed."""

    def __init__(
        self, directory: Path, refresh: float = 10.0, clock: Clock = time.monotonic
    ) -> None:
        self._directory = directory
        self._refresh = refresh
        self._clock = clock
        self._lock = threading.Lock()
        self._checked = -math.inf
        self._stamp: tuple[tuple[str, float], ...] = ()
        self._keys: tuple[str, ...] = ()

    def _files(self) -> list[Path]:
        # Secrets mount files through ..data symlinks; skip the dot entries themselves.
        return sorted(
            p for p in self._directory.iterdir() if not p.name.startswith(".") and p.is_file()
        )

    def keys(self) -> tuple[str, ...]:
        with self._lock:
            if self._clock() - self._checked < self._refresh:
                return self._keys
            self._checked = self._clock()
            files = self._files() if self._directory.is_dir() else []
            stamp = tuple((str(p), p.stat().st_mtime) for p in files)
            if stamp != self._stamp:
                self._stamp = stamp
                self._keys = tuple(
                    line.strip()
                    for p in files
                    for line in p.read_text().splitlines()
                    if line.strip()
                )
            return self._keys

    def check(self, key: str | None) -> bool:
        """Constant-time comparison against every accepted key."""
        if not key:
            return False
        matched = False
        for accepted in self.keys():
            matched |= hmac.compare_digest(accepted.encode(), key.encode())
        return matched


def parse_rate(text: str) -> float:
    """``100/s`` -> 100.0 tokens per second."""
    count, _, unit = text.partition("/")
    if not count.isdigit() or unit not in UNITS or int(count) <= 0:
        raise ValueError(f"a rate looks like 100/s, 600/m or 1000/h, not {text!r}")
    return int(count) / UNITS[unit]


@dataclass
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one will be available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """One token bucket per client; the least recently seen clients are forgotten beyond
    ``max_clients`` (a forgotten client starts with a full bucket)."""

    def __init__(
        self, rate: float, clock: Clock = time.monotonic, max_clients: int = 10_000
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)  # one second's worth
        self._clock = clock
        self._max = max_clients
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def wait_time(self, client: str) -> float:
        """0.0 to admit the request, else how long the client should wait."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.pop(client, None) or TokenBucket(
                self.rate, self.burst, self.burst, now
            )
            self._buckets[client] = bucket
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
            return bucket.take(now)


class ClientLabels:
    """Bounded label values for per-client counts: the first ``limit`` clients by name,
    ``other`` after that."""

    def __init__(self, limit: int = 100) -> None:
        self._limit = limit
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def label(self, client: str) -> str:
        with self._lock:
            if client in self._known:
                return client
            if len(self._known) < self._limit:
                self._known.add(client)
                return client
        return "other"


def too_many(reason: str, message: str, wait: float) -> ProtocolError:
    """A 429 that says when to come back, in whole seconds."""
    retry = max(1, math.ceil(wait))
    return ProtocolError(429, reason, f"{message}; retry in {retry}s", (f"retry-after: {retry}",))


class AccessControl:
    """Optional API keys and per-client rate limit, for HTTP and gRPC alike."""

    def __init__(
        self,
        keys: ApiKeys | None = None,
        limiter: RateLimiter | None = None,
        salt: bytes = b"",
        clients: ClientLabels | None = None,
        budget: QueryBudget | None = None,
    ) -> None:
        self.keys = keys
        self.limiter = limiter
        self.budget = budget
        self.salt = salt
        self.clients = clients or ClientLabels()

    def check(
        self,
        headers: Iterable[tuple[bytes, bytes]],
        peer: str,
        metrics: ClientCounter,
        *,
        limited: bool,
        copy: bool = False,
    ) -> str:
        """The client's id, or a ProtocolError (401, 429); counted either way. A shadow
        ``copy`` (verified by the proxy) is keyed but not limited: stable's door took its
        limits when the caller's request arrived."""
        client = self.identify(headers, peer, metrics)
        if copy:
            metrics.client_requests.labels(self.clients.label(client), "shadow_copy").inc()
            return client
        self.take(client, metrics, limited=limited)
        return client

    def identify(
        self, headers: Iterable[tuple[bytes, bytes]], peer: str, metrics: ClientCounter
    ) -> str:
        """The client: its key's salted hash when keys are on, else its address; 401 for a
        missing or wrong key."""
        if self.keys is None:
            return peer
        key = presented_key(headers)
        if key is None or not self.keys.check(key):
            metrics.client_requests.labels(UNKNOWN, "unauthorized").inc()
            message = "missing or wrong API key: send Authorization: Bearer <key> or X-API-Key"
            raise ProtocolError(
                401, "unauthorized", message, ('www-authenticate: Bearer realm="inference"',)
            )
        return client_id(key, self.salt)

    def take(self, client: str, metrics: ClientCounter, *, limited: bool) -> None:
        """Admit one call of ``client`` (a token from its bucket when ``limited``), or 429."""
        label = self.clients.label(client)
        if self.limiter is not None and limited:
            wait = self.limiter.wait_time(client)
            if wait > 0:
                metrics.client_requests.labels(label, "rate_limited").inc()
                raise too_many("rate_limited", "rate limit exceeded", wait)
        if self.budget is not None and limited:
            wait = self.budget.take(client)
            if wait > 0:
                metrics.client_requests.labels(label, "budget_exhausted").inc()
                message = (
                    f"query budget exhausted: {self.budget.describe()} per client"
                    " (spec.monitoring.auth.queryBudget)"
                )
                raise too_many("budget_exhausted", message, wait)
        # "admitted" counts inference calls only: the operator sums it for query budgets.
        metrics.client_requests.labels(label, "admitted" if limited else "metadata").inc()


def parse_window(text: str) -> float:
    """``24h`` -> 86400.0 seconds (``s``, ``m``, ``h`` or ``d``)."""
    units = {**UNITS, "d": 86400.0}
    number, unit = text[:-1], text[-1:]
    if not number.isdigit() or unit not in units or int(number) <= 0:
        raise ValueError(f"a budget window looks like 24h, 7d or 30m, not {text!r}")
    return int(number) * units[unit]


class QueryBudget:
    """At most ``limit`` inference calls per client in any ``window`` seconds.

    Counted here exactly, in ``BUCKETS`` buckets per window, for the calls this pod admitted,
    and exported as a gauge (``used``); across replicas through ``exhausted_file``: the
    operator sums every pod's gauge in Prometheus and writes the clients over budget into a
    mounted ConfigMap (JSON ``{"exhausted": {"<client>": <used>}}``), re-read when it changes.
    (A gauge of the window's count, not a counter: ``increase()`` misses a new series' first
    value, which for a budget of a few calls is all of it.)
    """

    BUCKETS = 24

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        exhausted_file: Path | None = None,
        clock: Clock = time.monotonic,
        refresh: float = 5.0,
        max_clients: int = 10_000,
    ) -> None:
        self.limit = limit
        self.window = window
        self._width = window / self.BUCKETS
        self._file = exhausted_file
        self._clock = clock
        self._refresh = refresh
        self._max = max_clients
        self._counts: OrderedDict[str, dict[int, int]] = OrderedDict()
        self._exhausted: dict[str, float] = {}
        self._stamp: float | None = None
        self._checked = -math.inf
        self._lock = threading.Lock()

    def describe(self) -> str:
        hours = self.window / 3600
        span = f"{hours:g}h" if hours >= 1 else f"{self.window / 60:g}m"
        return f"{self.limit} queries per {span}"

    def take(self, client: str) -> float:
        """0.0 to admit (and count) one call, else the seconds until the client may retry."""
        now = self._clock()
        bucket = int(now // self._width)
        with self._lock:
            if client in self._global_exhausted(now):
                return self._width  # the operator lists it again while it is over
            counts = self._counts.pop(client, None) or {}
            self._counts[client] = counts
            while len(self._counts) > self._max:
                self._counts.popitem(last=False)
            for old in [b for b in counts if b <= bucket - self.BUCKETS]:
                del counts[old]
            if sum(counts.values()) >= self.limit:
                oldest = min(counts)
                return (oldest + self.BUCKETS) * self._width - now
            counts[bucket] = counts.get(bucket, 0) + 1
            return 0.0

    def used(self) -> dict[str, int]:
        """Each client's calls admitted here within the window, now."""
        bucket = int(self._clock() // self._width)
        with self._lock:
            return {
                client: total
                for client, counts in self._counts.items()
                if (total := sum(n for b, n in counts.items() if b > bucket - self.BUCKETS))
            }

    def _global_exhausted(self, now: float) -> dict[str, float]:
        if self._file is None or now - self._checked < self._refresh:
            return self._exhausted
        self._checked = now
        try:
            stamp = self._file.stat().st_mtime
            if stamp != self._stamp:
                document = json.loads(self._file.read_text() or "{}")
                self._exhausted = {
                    str(k): float(v) for k, v in document.get("exhausted", {}).items()
                }
                self._stamp = stamp
        except (OSError, ValueError, AttributeError):
            self._exhausted = {}  # no file yet (the ConfigMap is optional), or unreadable
            self._stamp = None
        return self._exhausted
