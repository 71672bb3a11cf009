"""API keys, token buckets and bounded client labels, with a fake clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modeldeploy_runtime.access import (
    AccessControl,
    ApiKeys,
    ClientLabels,
    QueryBudget,
    RateLimiter,
    client_id,
    parse_rate,
    parse_window,
    presented_key,
)
from modeldeploy_runtime.http1 import ProtocolError
from modeldeploy_runtime.metrics import MAX_UNCONFIGURED_LABELS, BudgetCollector, RuntimeMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_are_read_from_a_secret_folder_and_reloaded_when_rotated(tmp_path: Path) -> None:
    (tmp_path / "team-a").write_text("alpha\n\nbeta\n")
    (tmp_path / "..data").mkdir()  # how kubelet mounts Secrets; never a key
    clock = Clock()
    keys = ApiKeys(tmp_path, refresh=10, clock=clock)
    assert keys.check("alpha")
    assert keys.check("beta")
    assert not keys.check("gamma")
    assert not keys.check(None)
    assert not keys.check("")
    (tmp_path / "team-a").write_text("gamma\n")
    os.utime(tmp_path / "team-a", (1, 1))  # a different mtime, as a rotation gives
    assert keys.check("alpha")  # not re-read before the refresh interval
    clock.now += 11
    assert keys.check("gamma")
    assert not keys.check("alpha")


def test_presented_key_and_client_id() -> None:
    assert presented_key([(b"authorization", b"Bearer s3cret")]) == "s3cret"
    assert presented_key([(b"x-api-key", b" s3cret ")]) == "s3cret"
    assert presented_key([(b"authorization", b"Basic abc")]) is None
    assert client_id("s3cret") == client_id("s3cret") != client_id("other")
    assert "s3cret" not in client_id("s3cret")
    # Keyed by the installation's salt: the same key is unrelated elsewhere.
    assert client_id("s3cret", b"site-a") != client_id("s3cret", b"site-b")
    assert len(client_id("s3cret", b"site-a")) == len("key-") + 16


def test_junk_keys_do_not_take_the_labels_of_real_clients(tmp_path: Path) -> None:
    (tmp_path / "clients").write_text("real\n")
    access = AccessControl(ApiKeys(tmp_path), clients=ClientLabels(limit=2), salt=b"s")
    metrics = RuntimeMetrics("stable")
    for i in range(100):
        with pytest.raises(ProtocolError):
            access.check([(b"x-api-key", f"junk-{i}".encode())], "10.0.0.1", metrics, limited=True)
    client = access.check([(b"x-api-key", b"real")], "10.0.0.1", metrics, limited=True)
    assert client == client_id("real", b"s")
    clients = {
        sample.labels["client"]
        for family in metrics.registry.collect()
        if family.name == "modeldeploy_runtime_client_requests"
        for sample in family.samples
    }
    assert clients == {"unknown", client}


@pytest.mark.parametrize(("text", "rate"), [("100/s", 100.0), ("600/m", 10.0), ("36/h", 0.01)])
def test_parse_rate(text: str, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("bad", ["fast", "0/s", "10/d", "-1/s"])
def test_parse_rate_rejects_nonsense(bad: str) -> None:
    with pytest.raises(ValueError, match="100/s"):
        parse_rate(bad)


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=5.0, clock=clock)
    assert [limiter.wait_time("a") for _ in range(5)] == [0.0] * 5
    assert limiter.wait_time("a") == pytest.approx(0.2)
    assert limiter.wait_time("b") == 0.0  # clients do not share buckets
    clock.now += 0.2
    assert limiter.wait_time("a") == 0.0
    clock.now += 10  # refills to the burst, not beyond
    assert [limiter.wait_time("a") for _ in range(6)][-1] > 0


def test_client_labels_are_bounded() -> None:
    labels = ClientLabels(limit=2)
    assert [labels.label(c) for c in ("a", "b", "c", "a")] == ["a", "b", "other", "a"]


def test_metric_labels_stay_bounded_without_a_configured_model() -> None:
    metrics = RuntimeMetrics("stable")
    seen = {metrics.bounded(f"model-{i}", "1")[0] for i in range(100)}
    assert len(seen) == MAX_UNCONFIGURED_LABELS + 1  # the first ones and "other"
    configured = RuntimeMetrics("stable", model="bert", version="3")
    assert configured.bounded("bert", "") == ("bert", "3")
    assert configured.bounded("bert", "9") == ("bert", "other")
    assert configured.bounded("gpt", "1") == ("other", "other")


def test_query_budget_counts_per_client_over_a_sliding_window() -> None:
    clock = Clock()
    budget = QueryBudget(3, parse_window("24h"), clock=clock)
    assert [budget.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    # Until the hour-wide bucket of the oldest query leaves the window (the clock is at 1000).
    assert budget.take("a") == pytest.approx(86400 - 1000)
    assert budget.take("b") == 0.0  # clients do not share budgets
    clock.now += 23 * 3600
    assert budget.take("a") > 0  # still inside the window
    clock.now += 3600
    assert budget.take("a") == 0.0
    assert budget.describe() == "3 queries per 24h"


def test_query_budget_honours_the_operators_list_across_replicas(tmp_path: Path) -> None:
    clock = Clock()
    listed = tmp_path / "exhausted.json"
    budget = QueryBudget(100, 3600, exhausted_file=listed, clock=clock, refresh=5)
    assert budget.take("a") == 0.0  # no list yet: the ConfigMap is optional
    listed.write_text('{"exhausted": {"a": 120}}')
    clock.now += 6
    assert budget.take("a") > 0
    assert budget.take("b") == 0.0
    listed.write_text('{"exhausted": {}}')
    os.utime(listed, (1, 1))
    clock.now += 6
    assert budget.take("a") == 0.0


def test_an_exhausted_budget_is_a_429_that_names_it(tmp_path: Path) -> None:
    (tmp_path / "clients").write_text("k\n")
    access = AccessControl(ApiKeys(tmp_path), budget=QueryBudget(1, 86400, clock=Clock()))
    metrics = RuntimeMetrics("stable")
    headers = [(b"x-api-key", b"k")]
    access.check(headers, "10.0.0.1", metrics, limited=False)  # metadata: not counted
    access.check(headers, "10.0.0.1", metrics, limited=True)
    with pytest.raises(ProtocolError) as caught:
        access.check(headers, "10.0.0.1", metrics, limited=True)
    assert caught.value.status == 429
    assert "1 queries per 24h" in caught.value.message
    assert "spec.monitoring.auth.queryBudget" in caught.value.message
    assert caught.value.headers[0].startswith("retry-after: ")


@pytest.mark.parametrize("bad", ["24", "0h", "1y", "h"])
def test_parse_window_rejects_nonsense(bad: str) -> None:
    with pytest.raises(ValueError, match="24h"):
        parse_window(bad)


def test_query_budget_exports_what_it_counted_in_the_window() -> None:
    clock = Clock()
    budget = QueryBudget(10, 3600, clock=clock)
    for _ in range(3):
        budget.take("a")
    budget.take("b")
    metrics = RuntimeMetrics("canary")
    metrics.registry.register(BudgetCollector(budget.used, "canary"))
    assert (
        metrics.registry.get_sample_value(
            "modeldeploy_runtime_client_budget_used", {"track": "canary", "client": "a"}
        )
        == 3
    )
    clock.now += 3600
    assert budget.used() == {}  # the window moved past them
