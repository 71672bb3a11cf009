"""Judging a canary's metrics: pure functions, after Argo Rollouts' ``assessMetricStatus``.

Each metric's value is compared with its thresholds. "No data" (an empty result, NaN) and
query errors are **inconclusive, never success**: a canary nobody measured is not healthy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from string import Template
from typing import Literal

Result = Literal["Passed", "Failed", "Inconclusive"]

# PromQL of the builtin metrics over the sidecars' series. $selector is the label matcher of
# one ModelDeployment's pods (as the chart's PodMonitor labels them), $interval the window.
BUILTIN_QUERIES: Mapping[str, str] = {
    "P99Latency": (
        "histogram_quantile(0.99, sum by (le) (rate("
        "modeldeploy_runtime_request_duration_seconds_bucket"
        '{$selector, track="canary"}[$interval])))'
    ),
    # Canary p99 over stable p99: 1.0 is "as fast as stable".
    "RelativeP99Latency": (
        "histogram_quantile(0.99, sum by (le) (rate("
        "modeldeploy_runtime_request_duration_seconds_bucket"
        '{$selector, track="canary"}[$interval])))'
        " / histogram_quantile(0.99, sum by (le) (rate("
        "modeldeploy_runtime_request_duration_seconds_bucket"
        '{$selector, track="stable"}[$interval])))'
    ),
    # Errors over all requests; "or vector(0)": no errors is 0, no requests stays no data.
    "ErrorRatio": (
        "(sum(rate(modeldeploy_runtime_requests_total"
        '{$selector, track="canary", code!~"2..|OK"}[$interval])) or vector(0))'
        " / sum(rate(modeldeploy_runtime_requests_total"
        '{$selector, track="canary"}[$interval]))'
    ),
    "DriftScore": 'max(modeldeploy_runtime_drift_score{$selector, track="canary"})',
    "QueueTime": 'avg(modeldeploy_runtime_triton_queue_seconds{$selector, track="canary"})',
}


class TemplateError(ValueError):
    """A query template names a variable nobody supplied."""


def render_query(template: str, variables: Mapping[str, str]) -> str:
    """``$name`` substitution that fails on a missing variable instead of sending bad PromQL."""
    try:
        return Template(template).substitute(variables)
    except KeyError as error:
        raise TemplateError(f"query template needs ${error.args[0]}") from error
    except ValueError as error:
        raise TemplateError(f"bad query template: {error}") from error


@dataclass(frozen=True)
class Measurement:
    """One metric's reading: a value, or None with why there is none."""

    name: str
    value: float | None
    min: float | None = None
    max: float | None = None
    error: str | None = None


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
    return f"{measurement.name} = {measurement.value:.4g} ({', '.join(bounds) or 'no bounds'})"
