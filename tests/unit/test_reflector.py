"""The reflector's list-then-watch loop over a scripted API: resume, 410, backoff, stop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from modeldeploy_operator.k8s.client import ApiError
from modeldeploy_operator.k8s.reflector import BACKOFF_MAX, BACKOFF_START, Reflector

Json = dict[str, Any]


def obj(name: str, version: str) -> Json:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": version}}


class ScriptedApi:
    """Lists and watches answered from scripts; each watch call takes the next script (a list
    of events, or an ApiError to raise). Out of scripts: stop."""

    def __init__(self, lists: list[Any], watches: list[Any], stop: threading.Event) -> None:
        self.lists, self.watches, self.stop = lists, watches, stop
        self.watched_from: list[str] = []

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
    ) -> Iterator[Json]:
        assert 300 <= timeout_seconds <= 600
        self.watched_from.append(resource_version)
        if not self.watches:
            self.stop.set()
            return iter(())
        script = self.watches.pop(0)
        if isinstance(script, ApiError):
            raise script
        return iter(script)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def replace(self, items: list[Json]) -> None:
        self.calls.append(("replace", [i["metadata"]["name"] for i in items]))

    def event(self, type_: str, obj: Json) -> None:
        self.calls.append((type_, obj["metadata"]["name"]))


def run(lists: list[Any], watches: list[Any]) -> tuple[ScriptedApi, Recorder, list[float]]:
    stop = threading.Event()
    api = ScriptedApi(lists, watches, stop)
    sink = Recorder()
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        return stop.is_set()

    Reflector(api, ("v1", "Pod", None), sink, stop=stop, wait=wait).run()
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
    api, sink, waits = run(
        [([], "10"), ([obj("a", "30")], "30"), ([obj("a", "30")], "31")],
        [[gone], ApiError(410, "Gone", "")],  # as an ERROR event, then as the HTTP status
    )
    assert sink.calls == [("replace", []), ("replace", ["a"]), ("replace", ["a"])]
    assert api.watched_from == ["10", "30", "31"]
    assert waits == []  # no backoff for an expiry


def test_failures_back_off_exponentially_and_a_good_list_resets_it() -> None:
    down = ApiError(0, "ConnectionFailed", "refused")
    _, sink, waits = run(
        [down, down, down, ([], "1"), ([], "2")],
        [down],
    )
    assert waits == [BACKOFF_START, BACKOFF_START * 2, BACKOFF_START * 4, BACKOFF_START]
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
    assert errors[0].startswith("Pod watch failed (403 Forbidden)")


def test_a_malformed_event_lists_again_instead_of_ending_the_thread() -> None:
    _, sink, waits = run(
        [([], "1"), ([obj("a", "2")], "2")],
        [[{"type": "ADDED", "object": "not an object"}]],
    )
    assert sink.calls == [("replace", []), ("replace", ["a"])]
    assert waits == [BACKOFF_START]
