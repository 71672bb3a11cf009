"""The Service clients call: Triton's standard ports, in front of every track's pods."""

from __future__ import annotations

from typing import Any

from modeldeploy_operator.api.v1alpha1 import ModelDeployment
from modeldeploy_operator.builders.deployment import TRITON_PORTS
from modeldeploy_operator.builders.labels import (
    child_metadata,
    common_labels,
    selector_labels,
    service_name,
)


def build_service(md: ModelDeployment) -> dict[str, Any]:
    """``<name>``: ports 8000 (HTTP) and 8001 (gRPC) whether or not the sidecar fronts Triton.

    With the runtime sidecar the ports lead to the proxy (which measures every request);
    without it, straight to Triton.
    """
    proxied = md.spec.monitoring.runtime.enabled
    ports = [
        {
            "name": name,
            "port": TRITON_PORTS[name],
            "targetPort": f"proxy-{name}" if proxied else name,
            "protocol": "TCP",
            "appProtocol": "kubernetes.io/h2c" if name == "grpc" else "http",
        }
        for name in ("http", "grpc")
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(md, service_name(md), common_labels(md)),
        "spec": {"type": "ClusterIP", "selector": selector_labels(md), "ports": ports},
    }
