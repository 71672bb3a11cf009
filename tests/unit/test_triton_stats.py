"""Queue and compute time from deltas of Triton's cumulative statistics."""

from __future__ import annotations

from modeldeploy_runtime.triton_stats import Snapshot, interval_means, parse_stats

STATS = {
    "model_stats": [
        {
            "name": "bert",
            "version": "1",
            "inference_stats": {
                "success": {"count": 10, "ns": 0},
                "queue": {"count": 10, "ns": 2_000_000},
                "compute_input": {"count": 10, "ns": 1_000_000},
                "compute_infer": {"count": 10, "ns": 50_000_000},
                "compute_output": {"count": 10, "ns": 1_000_000},
            },
        },
        {"name": "other", "version": "1", "inference_stats": {"success": {"count": 99}}},
    ]
}


def test_parse_stats_picks_the_model() -> None:
    assert parse_stats(STATS, "bert") == Snapshot(10, 2_000_000, 52_000_000)
    assert parse_stats(STATS, "bert", "2") is None
    assert parse_stats(STATS, "absent") is None


def test_interval_means() -> None:
    before = Snapshot(10, 2_000_000, 52_000_000)
    after = Snapshot(14, 6_000_000, 72_000_000)
    assert interval_means(before, after) == (0.001, 0.005)
    assert interval_means(after, after) is None  # nothing happened
    assert interval_means(after, Snapshot(1, 10, 10)) is None  # Triton restarted
