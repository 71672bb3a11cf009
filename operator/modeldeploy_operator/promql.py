"""The one home of the PromQL over the sidecars' series (and DCGM's and cAdvisor's): the
canary analysis's builtin metrics and the autoscaling metrics, and the template renderer
that fails on a missing variable instead of sending bad PromQL.

Autoscaling:

``$selector`` matches one ModelDeployment's pods as the chart's PodMonitor labels them,
``$pods`` its pod names (for exporters that label by pod), ``$window`` the rate window.
Per-replica metrics return the *total* over all replicas; the algorithm divides by the target.
"""

from __future__ import annotations

from collections.abc import Mapping
from string import Template

from modeldeploy_operator.api.v1alpha1 import ModelDeployment, ScalingMetric
from modeldeploy_operator.builders.labels import metric_selector

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
    # Shadow steps: stable's sidecars compare the canary's answers with their own on the same
    # mirrored requests ($revision: the canary's). Per output; the analysis takes the worst.
    "OutputDisagreement": (
        "sum by (output) (rate(modeldeploy_runtime_shadow_disagreements_total"
        '{$selector, revision="$revision"}[$interval]))'
        " / sum by (output) (rate(modeldeploy_runtime_shadow_rows_total"
        '{$selector, revision="$revision"}[$interval]))'
    ),
    "OutputError": (
        "sum by (output) (rate(modeldeploy_runtime_shadow_relative_error_total"
        '{$selector, revision="$revision"}[$interval]))'
        " / sum by (output) (rate(modeldeploy_runtime_shadow_rows_total"
        '{$selector, revision="$revision"}[$interval]))'
    ),
    "ShadowLatencyRatio": (
        "histogram_quantile(0.99, sum by (le) (rate("
        "modeldeploy_runtime_shadow_duration_seconds_bucket"
        '{$selector, revision="$revision", side="canary"}[$interval])))'
        " / histogram_quantile(0.99, sum by (le) (rate("
        "modeldeploy_runtime_shadow_duration_seconds_bucket"
        '{$selector, revision="$revision", side="stable"}[$interval])))'
    ),
    # The canary's failures on inputs stable answered; unreachable and refused copies (a pod
    # gone, the canary's door) are not the model's.
    "ShadowErrorRatio": (
        "(sum(rate(modeldeploy_runtime_shadow_requests_total"
        '{$selector, revision="$revision", result=~"error|timeout"}[$interval])) or vector(0))'
        " / sum(rate(modeldeploy_runtime_shadow_requests_total"
        '{$selector, revision="$revision", result=~"compared|error|timeout"}[$interval]))'
    ),
}
# Builtins measured per output: the worst one decides, and the message names it.
PER_OUTPUT = ("OutputDisagreement", "OutputError")
# Measured in shadow steps only: after them nothing is copied, and their windows would be
# empty (no data) in every weighted step.
SHADOW_BUILTINS = (*PER_OUTPUT, "ShadowLatencyRatio", "ShadowErrorRatio")


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


RATE_WINDOW = "1m"  # four scrapes at the usual 15 s: enough samples for a stable rate

QUERIES: Mapping[str, str] = {
    "InFlightPerReplica": "sum(modeldeploy_runtime_requests_in_flight{$selector})",
    "RPSPerReplica": "sum(rate(modeldeploy_runtime_requests_total{$selector}[$window]))",
    "P99Latency": (
        "histogram_quantile(0.99, sum by (le) (rate("
        "modeldeploy_runtime_request_duration_seconds_bucket{$selector}[$window])))"
    ),
    "QueueTime": "avg(modeldeploy_runtime_triton_queue_seconds{$selector})",
    # The DCGM exporter labels GPUs with the pod using them (namespace, pod).
    "GPUUtilization": 'avg(DCGM_FI_DEV_GPU_UTIL{namespace="$namespace", pod=~"$pods"})',
    # cAdvisor: cores used by the Triton containers over cores requested, in percent.
    "CPUUtilization": (
        "100 * sum(rate(container_cpu_usage_seconds_total"
        '{namespace="$namespace", pod=~"$pods", container="triton"}[$window]))'
        " / (count(count by (pod) (container_cpu_usage_seconds_total"
        '{namespace="$namespace", pod=~"$pods", container="triton"})) * $cpu)'
    ),
}
PER_REPLICA = ("InFlightPerReplica", "RPSPerReplica")
IDLE_QUERY = "sum(increase(modeldeploy_runtime_requests_total{$selector}[$idle]))"


def variables(md: ModelDeployment, cpu_cores: float | None = None) -> dict[str, str]:
    name = md.metadata.name
    found = {
        "selector": metric_selector(md),
        "namespace": md.metadata.namespace,
        "name": name,
        "pods": f"{name}-(stable|canary)-.+",
        "window": RATE_WINDOW,
    }
    if cpu_cores is not None:
        found["cpu"] = f"{cpu_cores:g}"
    return found


def query_of(metric: ScalingMetric, values: Mapping[str, str]) -> str:
    """The PromQL for one metric (``TemplateError`` when a variable is missing)."""
    template = metric.query if metric.type == "Custom" and metric.query else QUERIES[metric.type]
    return render_query(template, values)


def metric_name(metric: ScalingMetric) -> str:
    return metric.name or metric.type if metric.type == "Custom" else metric.type


BUDGET_USAGE_QUERY = "sum by (client) (modeldeploy_runtime_client_budget_used{$selector})"


def budget_usage_query(md: ModelDeployment) -> str:
    """Inference calls each API key made within its budget's window, summed over every
    replica and track (each sidecar exports its own exact count of the window)."""
    return render_query(BUDGET_USAGE_QUERY, {"selector": metric_selector(md)})
