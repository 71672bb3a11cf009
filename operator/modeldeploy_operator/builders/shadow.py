"""``<name>-shadow``: what stable's sidecars copy to the canary during a shadow step."""

from __future__ import annotations

import json
from typing import Any

from modeldeploy_operator.api.v1alpha1 import ModelDeployment
from modeldeploy_operator.builders.deployment import RUNTIME_PORTS, SHADOW_KEY
from modeldeploy_operator.builders.labels import (
    child_metadata,
    common_labels,
    shadow_configmap_name,
)


def build_shadow_configmap(
    md: ModelDeployment, revision: str, version: str, percent: int, targets: tuple[str, ...]
) -> dict[str, Any]:
    """The canary's revision, the share to copy and its pods' sidecars (HTTP and gRPC, from
    the pods' ``targets`` addresses); an empty document (``{}``: copy nothing) outside
    shadow steps."""
    document: dict[str, Any] = {}
    if percent:
        document = {
            "revision": revision,
            "version": version,
            "percent": percent,
            "targets": [f"{ip}:{RUNTIME_PORTS['proxy-http']}" for ip in targets],
            "grpcTargets": [f"{ip}:{RUNTIME_PORTS['proxy-grpc']}" for ip in targets],
        }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(md, shadow_configmap_name(md), common_labels(md)),
        "data": {SHADOW_KEY: json.dumps(document, sort_keys=True)},
    }
