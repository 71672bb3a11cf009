"""Which refused writes stay (and back off) and which pass (``act.Refusal``)."""

from __future__ import annotations

import pytest

from modeldeploy_operator.act import Refusal


@pytest.mark.parametrize(
    ("status", "transient"),
    [(403, False), (422, False), (404, False), (429, True), (409, True), (503, True), (0, True)],
)
def test_a_refusal_is_transient_when_throttled_conflicting_failing_or_unanswered(
    status: int, transient: bool
) -> None:
    refusal = Refusal(f"Deployment ns/m-stable was refused ({status}): no", status)
    assert refusal == f"Deployment ns/m-stable was refused ({status}): no"  # a message still
    assert refusal.transient is transient
