"""``<name>-activator``: the EndpointSlice that sends a scaled-to-zero model's callers to the
activator.

kube-proxy routes a Service to the endpoints of every EndpointSlice labelled with its name
(``kubernetes.io/service-name``), whoever manages the slice. So the Service keeps its
selector; beside the slice the endpoint-slice controller keeps of its pods (none at zero),
this one lists the activator's pods. The ``endpointslice.kubernetes.io/managed-by`` label
tells the controller the slice is not its own (it would delete it otherwise). Its ports carry
the Service's port names (``http``, ``grpc``), so kube-proxy maps each Service port to the
activator's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modeldeploy_operator.api.v1alpha1 import GROUP, ModelDeployment
from modeldeploy_operator.builders.labels import (
    activator_slice_name,
    child_metadata,
    common_labels,
    service_name,
)

Json = dict[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SLICE_MANAGER_LABEL = "endpointslice.kubernetes.io/managed-by"
SLICE_MANAGER = f"operator.{GROUP}"
CONTROLLER_SLICE_MANAGER = "endpointslice-controller.k8s.io"
SERVICE_PORTS = ("http", "grpc")  # the model Service's port names (builders/service.py)


@dataclass(frozen=True)
class Activator:
    """The activator's Ready pods, as its own Service's EndpointSlices list them: their
    addresses, and its ports by the Service's port names."""

    addresses: tuple[str, ...] = ()
    ports: tuple[tuple[str, int], ...] = ()  # (name, port): ("http", 8080), ("grpc", 8081)


def build_activator_slice(md: ModelDeployment, activator: Activator) -> Json:
    labels = {
        **common_labels(md),
        "app.kubernetes.io/component": "activation",
        SERVICE_NAME_LABEL: service_name(md),
        SLICE_MANAGER_LABEL: SLICE_MANAGER,
    }
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": child_metadata(md, activator_slice_name(md), labels),
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [address], "conditions": {"ready": True}}
            for address in activator.addresses
        ],
        "ports": [
            {"name": name, "port": port, "protocol": "TCP"}
            for name, port in activator.ports
            if name in SERVICE_PORTS
        ],
    }
