"""``<name>-shadow``: what stable's sidecars copy to the canary during a shadow step."""

from __future__ import annotations

import json
from typing import Any

from modeldeploy_operator.api.v1alpha1 import ModelDeployment
from modeldeploy_operator.builders.deployment import SHADOW_KEY
from modeldeploy_operator.builders.labels import (
    child_metadata,
    common_labels,
    shadow_configmap_name,
)


def build_shadow_configmap(
    md: ModelDeployment, revision: str, version: str, percent: int, targets: tuple[str, ...]
) -> dict[str, Any]:
    """The canary's revision, the share to copy and its sidecars' addresses; an empty
    document (``{}``: copy nothing) outside shadow steps."""
    document: dict[str, Any] = {}
    if percent:
        document = {
            "revision": revision,
            "version": version,
            "percent": percent,
            "targets": list(targets),
        }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(md, shadow_configmap_name(md), common_labels(md)),
        "data": {SHADOW_KEY: json.dumps(document, sort_keys=True)},
    }
