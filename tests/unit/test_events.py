"""The event correlator (``modeldeploy_operator.events``), on a fake clock."""

from __future__ import annotations

from modeldeploy_operator.events import EventCorrelator, EventWrite

RECREATED = ("uid-1", "Warning", "Recreated", "Service m was deleted; created it again")


def test_similar_events_patch_one_event_and_count() -> None:
    events = EventCorrelator()
    assert events.decide(RECREATED, 0.0) == EventWrite(None, 1)
    events.created(RECREATED, "m.abc")
    assert events.decide(RECREATED, 1.0) == EventWrite("m.abc", 2)
    assert events.decide(RECREATED, 2.0) == EventWrite("m.abc", 3)
    # Another message, reason or object is another Event.
    other = (*RECREATED[:3], "Deployment m-stable was deleted; created it again")
    assert events.decide(other, 3.0) == EventWrite(None, 1)
    assert events.decide(("uid-2", *RECREATED[1:]), 3.0) == EventWrite(None, 1)


def test_after_the_window_or_once_the_event_is_gone_a_new_one_is_posted() -> None:
    events = EventCorrelator(window=600)
    events.decide(RECREATED, 0.0)
    events.created(RECREATED, "m.abc")
    assert events.decide(RECREATED, 601.0) == EventWrite(None, 1)
    events.created(RECREATED, "m.def")
    assert events.decide(RECREATED, 602.0) == EventWrite("m.def", 2)
    events.gone(RECREATED)  # patching it found nothing: the same write creates one instead
    events.created(RECREATED, "m.ghi")
    assert events.decide(RECREATED, 603.0) == EventWrite("m.ghi", 2)


def test_an_event_whose_create_has_not_answered_yet_is_not_patched() -> None:
    events = EventCorrelator()
    events.decide(RECREATED, 0.0)  # its create failed: no name
    assert events.decide(RECREATED, 1.0) == EventWrite(None, 1)


def test_each_object_gets_a_burst_then_one_write_per_refill() -> None:
    events = EventCorrelator(burst=25, refill=300)
    writes = [events.decide(RECREATED, float(i)) for i in range(30)]
    assert sum(w is not None for w in writes) == 25
    assert events.decide(("uid-2", *RECREATED[1:]), 30.0) is not None  # another object's budget
    assert events.decide(RECREATED, 30.0 + 300) is not None  # one token back after 5 minutes
    assert events.decide(RECREATED, 30.0 + 301) is None


def test_a_deleted_object_is_forgotten() -> None:
    events = EventCorrelator(burst=1)
    events.decide(RECREATED, 0.0)
    events.created(RECREATED, "m.abc")
    events.forget("uid-1")
    assert events.decide(RECREATED, 1.0) == EventWrite(None, 1)  # a new budget, a new Event
