"""The objects of the external autoscaling engines: an autoscaling/v2 HorizontalPodAutoscaler
(engine ``hpa``) or a KEDA ScaledObject (engine ``keda``), both targeting the
ModelDeployment's scale subresource, so the operator splits whatever count they choose
between the stable and canary tracks.

The HPA reads Pods and External metrics through the Prometheus Adapter; the rules that
define those metric names are :data:`ADAPTER_RULES` (shipped by the chart, generated from
here). KEDA queries Prometheus itself, with the same PromQL as the builtin engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import yaml

from modeldeploy_operator.api.v1alpha1 import (
    API_VERSION,
    KIND,
    LATENCY_METRICS,
    AutoscalingSpec,
    ModelDeployment,
    ScalingMetric,
    parse_duration,
)
from modeldeploy_operator.builders.labels import child_metadata, common_labels
from modeldeploy_operator.promql import PER_REPLICA, metric_name, query_of, variables

HPA_API_VERSION = "autoscaling/v2"
KEDA_API_VERSION = "keda.sh/v1alpha1"
TRITON_CONTAINER = "triton"

# Metric names the Prometheus Adapter rules below provide to the HPA.
POD_METRICS: Mapping[str, str] = {
    "InFlightPerReplica": "modeldeploy_runtime_requests_in_flight",
    "RPSPerReplica": "modeldeploy_runtime_requests_per_second",
    "QueueTime": "modeldeploy_runtime_triton_queue_seconds",
    "GPUUtilization": "DCGM_FI_DEV_GPU_UTIL",
}
EXTERNAL_METRICS: Mapping[str, str] = {
    "P99Latency": "modeldeploy_runtime_request_duration_p99_seconds",
}


def _pod_resources() -> dict[str, Any]:
    return {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}}


ADAPTER_RULES: dict[str, Any] = {
    "rules": [
        {
            "seriesQuery": 'modeldeploy_runtime_requests_in_flight{namespace!="",pod!=""}',
            "resources": _pod_resources(),
            "name": {"as": POD_METRICS["InFlightPerReplica"]},
            "metricsQuery": "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
        },
        {
            "seriesQuery": 'modeldeploy_runtime_requests_total{namespace!="",pod!=""}',
            "resources": _pod_resources(),
            "name": {"as": POD_METRICS["RPSPerReplica"]},
            "metricsQuery": "sum(rate(<<.Series>>{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)",
        },
        {
            "seriesQuery": 'modeldeploy_runtime_triton_queue_seconds{namespace!="",pod!=""}',
            "resources": _pod_resources(),
            "name": {"as": POD_METRICS["QueueTime"]},
            "metricsQuery": "avg(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
        },
        {
            "seriesQuery": 'DCGM_FI_DEV_GPU_UTIL{namespace!="",pod!=""}',
            "resources": _pod_resources(),
            "name": {"as": POD_METRICS["GPUUtilization"]},
            "metricsQuery": "avg(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
        },
    ],
    "externalRules": [
        {
            "seriesQuery": (
                "modeldeploy_runtime_request_duration_seconds_bucket"
                '{namespace!="",modeldeployment!=""}'
            ),
            "resources": {"overrides": {"namespace": {"resource": "namespace"}}},
            "name": {"as": EXTERNAL_METRICS["P99Latency"]},
            "metricsQuery": (
                "histogram_quantile(0.99, sum(rate(<<.Series>>{<<.LabelMatchers>>}[1m])) by (le))"
            ),
        }
    ],
}


def target_value(metric: ScalingMetric) -> float:
    """The target as a number: seconds for durations, percent for utilisation."""
    if metric.type in LATENCY_METRICS:
        return parse_duration(str(metric.target))
    return float(metric.target)


def quantity(value: float) -> str:
    """A Kubernetes quantity for a non-negative number: 4, 250m, 1500u."""
    if float(value).is_integer():
        return str(int(value))
    milli = value * 1000
    if math.isclose(milli, round(milli)):
        return f"{round(milli)}m"
    return f"{round(value * 1_000_000)}u"


def _behavior(spec: AutoscalingSpec) -> dict[str, Any]:
    behavior = spec.behavior
    period = max(1, math.ceil(spec.interval_seconds()))
    up: dict[str, Any] = {
        "stabilizationWindowSeconds": math.ceil(parse_duration(behavior.scale_up_stabilization))
    }
    down: dict[str, Any] = {
        "stabilizationWindowSeconds": math.ceil(parse_duration(behavior.scale_down_stabilization))
    }
    if behavior.max_scale_up_step is not None:
        up["policies"] = [
            {"type": "Pods", "value": behavior.max_scale_up_step, "periodSeconds": period}
        ]
    if behavior.max_scale_down_step is not None:
        down["policies"] = [
            {"type": "Pods", "value": behavior.max_scale_down_step, "periodSeconds": period}
        ]
    return {"scaleUp": up, "scaleDown": down}


def _scale_target(md: ModelDeployment) -> dict[str, str]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": md.metadata.name}


def hpa_metric(md: ModelDeployment, metric: ScalingMetric) -> dict[str, Any]:
    target = target_value(metric)
    if metric.type == "CPUUtilization":
        return {
            "type": "ContainerResource",
            "containerResource": {
                "name": "cpu",
                "container": TRITON_CONTAINER,
                "target": {"type": "Utilization", "averageUtilization": int(target)},
            },
        }
    if metric.type in EXTERNAL_METRICS:
        return {
            "type": "External",
            "external": {
                "metric": {
                    "name": EXTERNAL_METRICS[metric.type],
                    "selector": {"matchLabels": {"modeldeployment": md.metadata.name}},
                },
                "target": {"type": "Value", "value": quantity(target)},
            },
        }
    return {
        "type": "Pods",
        "pods": {
            "metric": {"name": POD_METRICS[metric.type]},
            "target": {"type": "AverageValue", "averageValue": quantity(target)},
        },
    }


def build_hpa(md: ModelDeployment) -> dict[str, Any]:
    spec = md.spec.autoscaling
    if spec is None:
        raise ValueError("the ModelDeployment does not autoscale")
    return {
        "apiVersion": HPA_API_VERSION,
        "kind": "HorizontalPodAutoscaler",
        "metadata": child_metadata(md, md.metadata.name, common_labels(md)),
        "spec": {
            "scaleTargetRef": _scale_target(md),
            "minReplicas": spec.min_replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": [hpa_metric(md, m) for m in spec.metrics],
            "behavior": _behavior(spec),
        },
    }


def keda_trigger(md: ModelDeployment, metric: ScalingMetric, server: str) -> dict[str, Any]:
    target = target_value(metric)
    if metric.type == "CPUUtilization":
        return {
            "type": "cpu",
            "metricType": "Utilization",
            "metadata": {"value": str(int(target)), "containerName": TRITON_CONTAINER},
        }
    cpu = md.spec.resources.cpu
    values = variables(md, None if cpu is None else cpu_cores(cpu))
    return {
        "type": "prometheus",
        "name": metric_name(metric).lower(),
        # AverageValue: desired = total / target; Value: desired = current x value / target.
        "metricType": "AverageValue" if metric.type in PER_REPLICA else "Value",
        "metadata": {
            "serverAddress": server,
            "query": query_of(metric, values),
            "threshold": f"{target:g}",
        },
    }


def build_scaled_object(md: ModelDeployment, prometheus_url: str) -> dict[str, Any]:
    spec = md.spec.autoscaling
    if spec is None:
        raise ValueError("the ModelDeployment does not autoscale")
    zero = spec.scale_to_zero
    body: dict[str, Any] = {
        "scaleTargetRef": _scale_target(md),
        "pollingInterval": max(1, math.ceil(spec.interval_seconds())),
        "minReplicaCount": spec.floor(),
        "maxReplicaCount": spec.max_replicas,
        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(spec)}},
        "triggers": [keda_trigger(md, m, prometheus_url) for m in spec.metrics],
    }
    if zero is not None and zero.enabled:
        body["cooldownPeriod"] = math.ceil(parse_duration(zero.idle_after))
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": "ScaledObject",
        "metadata": child_metadata(md, md.metadata.name, common_labels(md)),
        "spec": body,
    }


def cpu_cores(value: int | str) -> float:
    """Cores of a CPU quantity: 4 -> 4.0, "500m" -> 0.5."""
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def render_adapter_rules() -> str:
    """The Prometheus Adapter rules the chart ships for the hpa engine (``make crds``)."""
    header = (
        "# Generated by `make crds` from modeldeploy_operator.builders.autoscaler.ADAPTER_RULES;"
        " do not edit.\n# Prometheus Adapter rules providing the metric names of"
        " spec.autoscaling.engine: hpa.\n"
    )
    return header + yaml.safe_dump(ADAPTER_RULES, sort_keys=False, width=100)


if __name__ == "__main__":
    print(render_adapter_rules(), end="")
