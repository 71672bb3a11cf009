"""Shared by the benchmarks: percentiles, and one section of docs/benchmarks.md each."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in [0, 1])."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def markers(key: str) -> tuple[str, str]:
    return f"<!-- {key}:begin -->", f"<!-- {key}:end -->"


def write_section(path: Path, key: str, heading: str, section: str) -> None:
    """Replace the text between ``key``'s markers (``section`` includes them), adding the
    section under ``## heading`` at the end when the page does not have it yet."""
    begin, end = markers(key)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin not in text:
        text = text.rstrip() + f"\n\n## {heading}\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    path.write_text(head + section + rest.split(end, 1)[1])
