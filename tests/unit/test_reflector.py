"""The reflector's list-then-watch loop over a scripted API: resume, 410, backoff, stalls,
contact, stop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from modeldeploy_operator.k8s.client import ApiError, WatchStalled
from modeldeploy_operator.k8s.reflector import (
    BACKOFF_MAX,
    BACKOFF_START,
    INACTIVITY_SECONDS,
    WATCH_SECONDS,
    Contact,
    Reflector,
)

Json = dict[str, Any]


def obj(name: str, version: str) -> Json:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": version}}


class ScriptedApi:
    """Lists and watches answered from scripts; each watch call takes the next script (a list
    of events, where an ApiError is raised when its turn comes, or an ApiError to raise at
    once). Out of scripts: stop."""

    def __init__(self, lists: list[Any], watches: list[Any], stop: threading.Event) -> None:
        self.lists, self.watches, self.stop = lists, watches, stop
        self.watched_from: list[str] = []

    def served(self, api_version: str, kind: str) -> bool:
        return True

    def list_all(
        self, api_version: str, kind: str, namespace: str | None, selector: str = ""
    ) -> tuple[list[Json], str]:
        answer = self.lists.pop(0)
        if isinstance(answer, ApiError):
            raise answer
        items, version = answer
        return items, version

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
    ) -> Iterator[Json]:
        assert WATCH_SECONDS <= timeout_seconds <= 2 * WATCH_SECONDS
        assert inactivity_seconds == INACTIVITY_SECONDS
        self.watched_from.append(resource_version)
        if not self.watches:
            self.stop.set()
            return iter(())
        script = self.watches.pop(0)
        if isinstance(script, ApiError):
            raise script
        return self._play(script)

    @staticmethod
    def _play(script: list[Any]) -> Iterator[Json]:
        for step in script:
            if isinstance(step, ApiError):
                raise step
            yield step


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def replace(self, items: list[Json]) -> None:
        self.calls.append(("replace", [i["metadata"]["name"] for i in items]))

    def event(self, type_: str, obj: Json) -> None:
        self.calls.append((type_, obj["metadata"]["name"]))


def run(
    lists: list[Any],
    watches: list[Any],
    relists: list[tuple[str, str]] | None = None,
    stalls: list[str] | None = None,
    contact: Contact | None = None,
) -> tuple[ScriptedApi, Recorder, list[float]]:
    stop = threading.Event()
    api = ScriptedApi(lists, watches, stop)
    sink = Recorder()
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        return stop.is_set()

    Reflector(
        api,
        ("v1", "Pod", None),
        sink,
        stop=stop,
        wait=wait,
        on_relist=lambda watch, why: (relists if relists is not None else []).append((watch, why)),
        on_stall=(stalls if stalls is not None else []).append,
        contact=contact,
    ).run()
    return api, sink, waits


def test_lists_then_hands_over_events_and_resumes_from_the_last_version() -> None:
    api, sink, waits = run(
        [([obj("a", "5")], "10")],
        [
            [
                {"type": "ADDED", "object": obj("b", "11")},
                {"type": "BOOKMARK", "object": obj("", "15")},
            ],
            [{"type": "DELETED", "object": obj("a", "16")}],
        ],
    )
    assert sink.calls == [("replace", ["a"]), ("ADDED", "b"), ("DELETED", "a")]
    assert api.watched_from == ["10", "15", "16"]  # the bookmark moved it on
    assert waits == []


def test_an_expired_version_lists_again_at_once() -> None:
    gone = {"type": "ERROR", "object": {"code": 410, "reason": "Expired", "message": "too old"}}
    relists: list[tuple[str, str]] = []
    api, sink, waits = run(
        [([], "10"), ([obj("a", "30")], "30"), ([obj("a", "30")], "31")],
        [[gone], ApiError(410, "Gone", "")],  # as an ERROR event, then as the HTTP status
        relists,
    )
    assert sink.calls == [("replace", []), ("replace", ["a"]), ("replace", ["a"])]
    assert api.watched_from == ["10", "30", "31"]
    assert waits == []  # no backoff for an expiry
    assert relists == [("Pod", "expired"), ("Pod", "expired")]


def test_a_silent_stream_is_watched_again_from_its_last_version_without_a_list() -> None:
    silent = WatchStalled("/api/v1/pods", INACTIVITY_SECONDS)
    stalls: list[str] = []
    relists: list[tuple[str, str]] = []
    api, sink, waits = run(
        [([], "10")],
        [[{"type": "ADDED", "object": obj("a", "12")}, silent], [silent]],
        relists,
        stalls,
    )
    assert api.watched_from == ["10", "12", "12"]  # where the silence began, not the list
    assert sink.calls == [("replace", []), ("ADDED", "a")]
    assert stalls == ["Pod", "Pod"]
    assert relists == []
    assert waits == []


def test_contact_is_each_list_event_bookmark_and_server_end_and_silence_is_timed() -> None:
    now = [100.0]
    contact = Contact(clock=lambda: now[0])
    assert contact.silence() == {}

    class Ticking(ScriptedApi):
        def list_all(
            self, api_version: str, kind: str, namespace: str | None, selector: str = ""
        ) -> tuple[list[Json], str]:
            now[0] += 1
            return super().list_all(api_version, kind, namespace, selector)

    stop = threading.Event()
    api = Ticking([([], "10")], [[{"type": "BOOKMARK", "object": obj("", "11")}]], stop)
    Reflector(api, ("v1", "Pod", "ns"), Recorder(), stop=stop, contact=contact).run()
    assert contact.silence() == {"Pod in ns": 0.0}
    now[0] += 42
    assert contact.silence() == {"Pod in ns": 42.0}


def test_failures_back_off_exponentially_and_a_good_list_resets_it() -> None:
    down = ApiError(0, "ConnectionFailed", "refused")
    relists: list[tuple[str, str]] = []
    _, sink, waits = run(
        [down, down, down, ([], "1"), ([], "2")],
        [down],
        relists,
    )
    assert waits == [BACKOFF_START, BACKOFF_START * 2, BACKOFF_START * 4, BACKOFF_START]
    assert relists == [("Pod", "error")] * 4
    assert sink.calls == [("replace", []), ("replace", [])]  # each good list, once


def test_the_backoff_stops_growing_at_its_cap() -> None:
    down = ApiError(503, "ServiceUnavailable", "")
    _, _, waits = run([down] * 10 + [([], "1")], [])
    assert max(waits) == BACKOFF_MAX
    assert waits[-1] == BACKOFF_MAX


def test_not_synced_until_a_list_succeeds_and_a_stop_ends_the_backoff() -> None:
    stop = threading.Event()
    api = ScriptedApi([ApiError(403, "Forbidden", "no")], [], stop)

    def wait(seconds: float) -> bool:
        stop.set()
        return True

    sink = Recorder()
    errors: list[str] = []
    Reflector(api, ("v1", "Pod", "ns"), sink, stop=stop, on_error=errors.append, wait=wait).run()
    assert sink.calls == []  # never listed: the cache stays not ready
    assert errors[0].startswith("Pod in ns watch failed (403 Forbidden)")


def test_a_malformed_event_lists_again_instead_of_ending_the_thread() -> None:
    _, sink, waits = run(
        [([], "1"), ([obj("a", "2")], "2")],
        [[{"type": "ADDED", "object": "not an object"}]],
    )
    assert sink.calls == [("replace", []), ("replace", ["a"])]
    assert waits == [BACKOFF_START]
