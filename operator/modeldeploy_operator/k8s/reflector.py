"""One kind's list-then-watch loop, client-go's Reflector: list every object (in pages), hand
the whole list over, then watch from the list's resourceVersion and hand over each event.
A watch the server ends is resumed from the last resourceVersion seen (bookmarks move it on
at rest); an expired one (410 Gone) is listed again; any other failure waits with
exponential backoff (0.8 s doubling to 30 s, client-go's) and lists again.

It knows nothing of what the objects mean: a :class:`Sink` receives them. It runs in its own
thread, because the watch reads block.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from modeldeploy_operator.k8s.client import ApiError

Json = dict[str, Any]

BACKOFF_START = 0.8
BACKOFF_MAX = 30.0
WATCH_SECONDS = (300, 600)  # each watch asks the server to end it after a random time in here


class WatchApi(Protocol):
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
    ) -> Iterator[Json]: ...


class Sink(Protocol):
    def replace(self, items: list[Json]) -> None:
        """Everything there is, as one list says (the first list, and every re-list)."""

    def event(self, type_: str, obj: Json) -> None:
        """ADDED, MODIFIED or DELETED."""


class Reflector:
    """``run`` lists and watches until ``stop``. The sink knows when the first list arrived
    (its first ``replace``: client-go's HasSynced)."""

    def __init__(
        self,
        api: WatchApi,
        resource: tuple[str, str, str | None],  # (api version, kind, namespace or None)
        sink: Sink,
        *,
        selector: str = "",
        stop: threading.Event,
        on_error: Callable[[str], None] = lambda _: None,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        self._api = api
        self.api_version, self.kind, self.namespace = resource
        self._sink = sink
        self._selector = selector
        self._stop = stop
        self._on_error = on_error
        self._wait = wait or stop.wait  # returns True when stopped

    def run(self) -> None:
        backoff = BACKOFF_START
        while not self._stop.is_set():
            try:
                version = self._list()
                backoff = BACKOFF_START
                self._watch(version)
            except ApiError as failure:
                if failure.status == 410:
                    continue  # expired: list again at once
                self._on_error(
                    f"{self.kind} watch failed ({failure.status} {failure.reason}):"
                    f" {failure.message}; listing again in {backoff:.1f} s"
                )
            except Exception as failure:  # a bad line must not end the thread
                self._on_error(
                    f"{self.kind} watch failed ({type(failure).__name__}: {failure});"
                    f" listing again in {backoff:.1f} s"
                )
            else:
                continue  # stopped
            if self._wait(backoff):
                return
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _list(self) -> str:
        items, version = self._api.list_all(
            self.api_version, self.kind, self.namespace, self._selector
        )
        self._sink.replace(items)
        return version

    def _watch(self, version: str) -> None:
        """Watch from ``version`` until stopped; returns never, raises to list again."""
        while not self._stop.is_set():
            events = self._api.watch(
                self.api_version,
                self.kind,
                self.namespace,
                selector=self._selector,
                resource_version=version,
                timeout_seconds=random.randint(*WATCH_SECONDS),  # noqa: S311 (spread, not secrets)
            )
            for event in events:
                if self._stop.is_set():
                    return
                type_, obj = event.get("type"), event.get("object") or {}
                if type_ == "ERROR":  # a Status; 410 when the version is too old
                    raise ApiError(
                        int(obj.get("code") or 0),
                        str(obj.get("reason") or "Error"),
                        str(obj.get("message") or ""),
                    )
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if type_ in ("ADDED", "MODIFIED", "DELETED"):
                    self._sink.event(type_, obj)
