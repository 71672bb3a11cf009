"""Names, labels, owner references and the revision hash shared by every child object."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel

from modeldeploy_operator.api.v1alpha1 import API_VERSION, GROUP, KIND, ModelDeployment

Track = Literal["stable", "canary"]
MANAGER = "modeldeploy"  # app.kubernetes.io/managed-by and the server-side apply field manager

MD_LABEL = f"{GROUP}/modeldeployment"
TRACK_LABEL = f"{GROUP}/track"
REVISION_LABEL = f"{GROUP}/revision"
# On nodes whose model cache holds an archive (the operator adds it when a pod there reports
# the digest): ``cache.modeldeploy.io/sha256.<48 hex digits>``.
CACHE_LABEL_PREFIX = "cache.modeldeploy.io/"


def cache_label(digest: str) -> str:
    return f"{CACHE_LABEL_PREFIX}sha256.{digest.removeprefix('sha256:')[:48]}"


MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"


def deployment_name(md: ModelDeployment, track: Track) -> str:
    return f"{md.metadata.name}-{track}"


def service_name(md: ModelDeployment) -> str:
    return md.metadata.name


def budget_configmap_name(md: ModelDeployment) -> str:
    return f"{md.metadata.name}-query-budgets"


def shadow_configmap_name(md: ModelDeployment) -> str:
    return f"{md.metadata.name}-shadow"


def activator_slice_name(md: ModelDeployment) -> str:
    return f"{md.metadata.name}-activator"


def selector_labels(md: ModelDeployment, track: Track | None = None) -> dict[str, str]:
    """Labels that select this ModelDeployment's pods; all tracks when ``track`` is None."""
    labels = {MD_LABEL: md.metadata.name}
    if track is not None:
        labels[TRACK_LABEL] = track
    return labels


def selector_string(md: ModelDeployment) -> str:
    """``status.selector`` for the scale subresource: every pod of every track."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(md).items()))


def common_labels(md: ModelDeployment) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "triton-inference-server",
        "app.kubernetes.io/instance": md.metadata.name,
        "app.kubernetes.io/component": "predictor",
        MANAGED_BY_LABEL: MANAGER,
        MD_LABEL: md.metadata.name,
    }


def track_labels(md: ModelDeployment, track: Track, revision: str) -> dict[str, str]:
    return {
        **common_labels(md),
        "app.kubernetes.io/version": md.spec.model.version,
        TRACK_LABEL: track,
        REVISION_LABEL: revision,
    }


def owner_reference(md: ModelDeployment) -> dict[str, Any]:
    """Makes the ModelDeployment the controller of a child, so deleting it deletes them."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": md.metadata.name,
        "uid": md.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(md: ModelDeployment, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": md.metadata.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(md)],
    }


def revision_of(md: ModelDeployment, runtime_image: str) -> str:
    """A short hash of everything that shapes the pods; a new revision means new pods.

    Replica counts, autoscaling and rollout settings are left out: they change how many pods
    run and how traffic moves, not what a pod is. Fields at their defaults are left out too,
    so a new optional field in the API does not give every existing object a new revision
    (and a rollout) when the operator is upgraded.
    """
    spec = md.spec

    def shape(part: BaseModel) -> dict[str, Any]:
        return part.model_dump(mode="json", by_alias=True, exclude_defaults=True)

    shaping = {
        "model": shape(spec.model),
        "server": shape(spec.server),
        "resources": shape(spec.resources),
        "placement": shape(spec.placement),
        "monitoring": shape(spec.monitoring),
        "runtimeImage": runtime_image,
    }
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()
    return digest[:10]


def metric_selector(md: ModelDeployment) -> str:
    """The PromQL label matcher of one ModelDeployment's pods, as the chart's PodMonitor labels
    them (namespace and modeldeployment target labels)."""
    return f'namespace="{md.metadata.namespace}", modeldeployment="{md.metadata.name}"'
