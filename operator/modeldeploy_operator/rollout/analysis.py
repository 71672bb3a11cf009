"""Judging a canary's metrics: pure functions, after Argo Rollouts' ``assessMetricStatus``.

Each metric's value is compared with its thresholds. "No data" (an empty result, NaN) and
query errors are **inconclusive, never success**: a canary nobody measured is not healthy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Result = Literal["Passed", "Failed", "Inconclusive"]


@dataclass(frozen=True)
class Measurement:
    """One metric's reading: a value, or None with why there is none."""

    name: str
    value: float | None
    min: float | None = None
    max: float | None = None
    error: str | None = None
    detail: str = ""  # where the value comes from, e.g. "output probabilities"


def assess(measurement: Measurement) -> Result:
    value = measurement.value
    if measurement.error is not None or value is None or math.isnan(value):
        return "Inconclusive"
    if measurement.min is not None and value < measurement.min:
        return "Failed"
    if measurement.max is not None and value > measurement.max:
        return "Failed"
    return "Passed"


def verdict(measurements: Iterable[Measurement]) -> tuple[Result, Measurement | None]:
    """The whole check: Failed if any metric failed, else Inconclusive if any was, else Passed;
    with the metric that decided it (for the condition message and the Event)."""
    results = [(assess(m), m) for m in measurements]
    for wanted in ("Failed", "Inconclusive"):
        for result, measurement in results:
            if result == wanted:
                return result, measurement
    return "Passed", None


def describe(measurement: Measurement) -> str:
    """``p99 = 0.612 > max 0.25`` or ``errors: no data``."""
    if measurement.error is not None:
        return f"{measurement.name}: {measurement.error}"
    if measurement.value is None or math.isnan(measurement.value):
        return f"{measurement.name}: no data"
    bounds = []
    if measurement.min is not None:
        bounds.append(f"min {measurement.min:g}")
    if measurement.max is not None:
        bounds.append(f"max {measurement.max:g}")
    where = f" on {measurement.detail}" if measurement.detail else ""
    limits = ", ".join(bounds) or "no bounds"
    return f"{measurement.name}{where} = {measurement.value:.4g} ({limits})"
