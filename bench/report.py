"""Shared by the benchmarks: percentiles, and one section of docs/benchmarks.md each."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


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


def wait(what: str, check: Callable[[], Any], timeout: float, period: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done in {timeout:.0f}s")
        time.sleep(period)
