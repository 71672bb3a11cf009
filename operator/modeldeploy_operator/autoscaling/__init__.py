"""Replica decisions for ModelDeployments that autoscale: pure functions.

Today the builtin engine keeps the replica count within ``[minReplicas, maxReplicas]``;
deciding on inference signals (in-flight requests, latency, GPU utilisation) arrives with the
autoscaling issue. The hpa and keda engines leave replicas to their controllers.
"""

from __future__ import annotations

from modeldeploy_operator.api.v1alpha1 import AutoscalingSpec

AUTOSCALER_MANAGER = "modeldeploy-autoscaler"  # field manager that owns spec.replicas


def desired_replicas(current: int | None, spec: AutoscalingSpec) -> int | None:
    """The replica count the builtin autoscaler wants, or None to leave it alone."""
    if spec.engine != "builtin":
        return None
    start = spec.min_replicas if current is None else current
    return min(max(start, spec.min_replicas), spec.max_replicas)
