"""One kind's list-then-watch loop, client-go's Reflector: list every object (in pages), hand
the whole list over, then watch from the list's resourceVersion and hand over each event.
A watch the server ends is resumed from the last resourceVersion seen (bookmarks move it on
at rest); an expired one (410 Gone) is listed again; any other failure waits with
exponential backoff (0.8 s doubling to 30 s, client-go's) and lists again.

A stream that goes silent is dead, whatever TCP believes: the API server sends a bookmark
about every minute, so a watch that hears nothing (no event, no bookmark) for
``inactivity_seconds`` (70 s, kopf's default) is dropped and resumed from its last
resourceVersion, and counted as a stall. :class:`Contact` remembers when each watch last
heard from the server: health fails while one has heard nothing for longer than that.

It knows nothing of what the objects mean: a :class:`Sink` receives them. It runs in its own
thread, because the watch reads block.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from modeldeploy_operator.k8s.client import ApiError, WatchStalled

Json = dict[str, Any]

BACKOFF_START = 0.8
BACKOFF_MAX = 30.0
WATCH_SECONDS = 300  # each watch asks the server to end it after between this and twice it
INACTIVITY_SECONDS = 70.0  # bookmarks come about every 60 s; kopf's inactivity_timeout too


class WatchApi(Protocol):
    def served(self, api_version: str, kind: str) -> bool: ...

    def list_all(
        self, api_version: str, kind: str, namespace: str | None, selector: str = ""
    ) -> tuple[list[Json], str]: ...

    def watch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        *,
        selector: str,
        resource_version: str,
        timeout_seconds: int,
        inactivity_seconds: float,
    ) -> Iterator[Json]: ...


class Sink(Protocol):
    def replace(self, items: list[Json]) -> None:
        """Everything there is, as one list says (the first list, and every re-list)."""

    def event(self, type_: str, obj: Json) -> None:
        """ADDED, MODIFIED or DELETED."""


@dataclass(frozen=True)
class WatchTiming:
    """How long a watch may stay silent, and after how long the server ends each one."""

    inactivity_seconds: float = INACTIVITY_SECONDS
    watch_seconds: int = WATCH_SECONDS


class Contact:
    """When each watch last heard from the API server: a list, a stream opened, an event or
    a bookmark, a stream the server ended. Thread-safe; the clock is injectable."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heard: dict[str, float] = {}
        self._lock = threading.Lock()

    def heard(self, watch: str) -> None:
        with self._lock:
            self._heard[watch] = self._clock()

    def silence(self) -> dict[str, float]:
        """Seconds since each watch last heard from the server."""
        now = self._clock()
        with self._lock:
            return {watch: now - at for watch, at in self._heard.items()}


class Reflector:
    """``run`` lists and watches until ``stop``. The sink knows when the first list arrived
    (its first ``replace``: client-go's HasSynced)."""

    def __init__(  # noqa: PLR0913 - hooks and settings, each with a default
        self,
        api: WatchApi,
        resource: tuple[str, str, str | None],  # (api version, kind, namespace or None)
        sink: Sink,
        *,
        selector: str = "",
        stop: threading.Event,
        on_error: Callable[[str], None] = lambda _: None,
        on_stall: Callable[[str], None] = lambda _: None,
        on_relist: Callable[[str, str], None] = lambda _, __: None,
        wait: Callable[[float], bool] | None = None,
        contact: Contact | None = None,
        inactivity_seconds: float = INACTIVITY_SECONDS,
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self._api = api
        self.api_version, self.kind, self.namespace = resource
        self._sink = sink
        self._selector = selector
        self._stop = stop
        self._on_error = on_error
        self._on_stall = on_stall
        self._on_relist = on_relist  # (watch, "expired" or "error"): listing again
        self._version = ""  # the last resourceVersion seen, where a watch resumes
        self._wait = wait or stop.wait  # returns True when stopped
        self._contact = contact or Contact()
        self._inactivity = inactivity_seconds
        self._watch_seconds = watch_seconds
        self.name = self.kind if self.namespace is None else f"{self.kind} in {self.namespace}"

    def run(self) -> None:
        backoff = BACKOFF_START
        while not self._stop.is_set():
            try:
                version = self._list()
                backoff = BACKOFF_START
                self._watch(version)
            except ApiError as failure:
                if failure.status == 410:
                    self._on_relist(self.name, "expired")
                    continue  # expired: list again at once
                self._on_error(
                    f"{self.name} watch failed ({failure.status} {failure.reason}):"
                    f" {failure.message}; listing again in {backoff:.1f} s"
                )
            except Exception as failure:  # a bad line must not end the thread
                self._on_error(
                    f"{self.name} watch failed ({type(failure).__name__}: {failure});"
                    f" listing again in {backoff:.1f} s"
                )
            else:
                continue  # stopped
            if self._wait(backoff):
                return
            self._on_relist(self.name, "error")
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _list(self) -> str:
        items, version = self._api.list_all(
            self.api_version, self.kind, self.namespace, self._selector
        )
        self._contact.heard(self.name)
        self._sink.replace(items)
        return version

    def _watch(self, version: str) -> None:
        """Watch from ``version`` until stopped; returns never, raises to list again. A silent
        stream is dropped and watched again from the last version seen: nothing is missed,
        nothing listed again."""
        self._version = version
        while not self._stop.is_set():
            try:
                self._stream()
            except WatchStalled:
                self._on_stall(self.name)
                self._on_error(
                    f"{self.name} watch heard nothing for {self._inactivity:g} s;"
                    f" watching again from resourceVersion {self._version}"
                )
                continue
            self._contact.heard(self.name)  # the server ended it: alive

    def _stream(self) -> None:
        """One watch request, from the last version seen, until the server ends it."""
        events = self._api.watch(
            self.api_version,
            self.kind,
            self.namespace,
            selector=self._selector,
            resource_version=self._version,
            # spread, so watches do not all end at once (not secrets)
            timeout_seconds=random.randint(self._watch_seconds, 2 * self._watch_seconds),  # noqa: S311
            inactivity_seconds=self._inactivity,
        )
        self._contact.heard(self.name)  # the server answered: the stream is open
        for event in events:
            self._contact.heard(self.name)
            if self._stop.is_set():
                return
            type_, obj = event.get("type"), event.get("object") or {}
            if type_ == "ERROR":  # a Status; 410 when the version is too old
                raise ApiError(
                    int(obj.get("code") or 0),
                    str(obj.get("reason") or "Error"),
                    str(obj.get("message") or ""),
                )
            self._version = str((obj.get("metadata") or {}).get("resourceVersion") or self._version)
            if type_ in ("ADDED", "MODIFIED", "DELETED"):
                self._sink.event(type_, obj)
