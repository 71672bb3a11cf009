"""The test-only fault point that ends the operator between two writes."""

from __future__ import annotations

import pytest

from modeldeploy_operator.__main__ import parse_args
from modeldeploy_operator.k8s.faults import CRASH_EXIT_CODE, ENVIRONMENT, CrashAfterWrites


def test_it_lets_n_writes_through_and_dies_at_the_next() -> None:
    deaths: list[int] = []
    fault = CrashAfterWrites(2, die=deaths.append)
    assert fault()
    assert fault()
    assert deaths == []
    fault()
    assert deaths == [CRASH_EXIT_CODE]


def test_it_is_armed_by_the_environment_or_not_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENVIRONMENT, raising=False)
    assert parse_args([]).crash_after_writes is None
    monkeypatch.setenv(ENVIRONMENT, "3")
    assert parse_args([]).crash_after_writes == 3
