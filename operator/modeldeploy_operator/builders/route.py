"""Gateway API traffic splitting: per-track Services and the HTTPRoute the operator owns.

With ``spec.rollout.trafficRouting.gatewayAPI``, clients come through a Gateway; the route
sends ``100 - weight`` percent to ``<name>-stable`` and ``weight`` to ``<name>-canary``
(Services selecting one track each), so the canary's share no longer depends on pod counts.
"""

from __future__ import annotations

from typing import Any

from modeldeploy_operator.api.v1alpha1 import GatewayRouting, ModelDeployment
from modeldeploy_operator.builders.deployment import TRITON_PORTS
from modeldeploy_operator.builders.labels import (
    Track,
    child_metadata,
    common_labels,
    deployment_name,
    selector_labels,
)
from modeldeploy_operator.builders.service import build_service


def gateway_routing(md: ModelDeployment) -> GatewayRouting | None:
    rollout = md.spec.rollout
    routing = rollout.traffic_routing if rollout else None
    return routing.gateway_api if routing else None


def build_track_service(md: ModelDeployment, track: Track) -> dict[str, Any]:
    """``<name>-<track>``: the shared Service's ports, in front of one track's pods."""
    service = build_service(md)
    service["metadata"] = child_metadata(
        md, deployment_name(md, track), {**common_labels(md), "serving.modeldeploy.io/track": track}
    )
    service["spec"]["selector"] = selector_labels(md, track)
    return service


def build_route(md: ModelDeployment, routing: GatewayRouting, canary_weight: int) -> dict[str, Any]:
    """The HTTPRoute: ``canary_weight`` percent to the canary, the rest to stable."""
    port = TRITON_PORTS["http"]
    spec: dict[str, Any] = {
        "parentRefs": routing.parent_refs,
        "rules": [
            {
                "backendRefs": [
                    {
                        "name": deployment_name(md, "stable"),
                        "port": port,
                        "weight": 100 - canary_weight,
                    },
                    {"name": deployment_name(md, "canary"), "port": port, "weight": canary_weight},
                ]
            }
        ],
    }
    if routing.hostnames:
        spec["hostnames"] = routing.hostnames
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": child_metadata(md, md.metadata.name, common_labels(md)),
        "spec": spec,
    }
