"""The Triton Deployment of one track: pure, golden-file tested.

A pod has three parts:

- ``fetch-model`` (init): the runtime image fetches the model repository from
  ``spec.model.storageUri`` into a shared ``emptyDir`` and writes Triton's ``config.pbtxt``;
  the credentials Secret is mounted here and nowhere else.
- ``triton``: serves the repository read-only with ``--model-control-mode=none``.
- ``runtime`` (when ``spec.monitoring.runtime.enabled``): the sidecar proxy in front of
  Triton that exports latency and drift metrics; the Service targets it. It is then the only
  door: Triton listens on 127.0.0.1 only, and its probes ask the sidecar about it.

Every container meets the restricted Pod Security Standard.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from modeldeploy_operator.api.v1alpha1 import GROUP, ModelDeployment
from modeldeploy_operator.builders.labels import (
    Track,
    budget_configmap_name,
    cache_label,
    child_metadata,
    deployment_name,
    selector_labels,
    shadow_configmap_name,
    track_labels,
)

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
MODEL_REPOSITORY = "/models"
CREDENTIALS_DIR = "/var/run/secrets/modeldeploy/model-credentials"
# The Secret volumes: a missing Secret is learned from the kubelet's FailedMount Events, which
# name the volume (observe.unmounted_secrets).
CREDENTIALS_VOLUME = "model-credentials"
API_KEYS_VOLUME = "api-keys"
PVC_ROOT = "/mnt/model-source"
PROFILE_DIR = "/etc/modeldeploy/reference-profile"
MODEL_CACHE = "/var/cache/modeldeploy/models"
ARCHIVE_FILE = "modeldeploy.json"  # the runtime's archive.ARCHIVE_MANIFEST, in the model folder
API_KEYS_DIR = "/var/run/secrets/modeldeploy/api-keys"
BUDGETS_DIR = "/etc/modeldeploy/query-budgets"
BUDGETS_KEY = "exhausted.json"
SHADOW_DIR = "/etc/modeldeploy/shadow"
SHADOW_KEY = "shadow.json"
# The canary's pods of a rollout with shadow steps wait behind this readiness gate: loaded
# but not Ready, so no Service sends them users, until the operator opens it after the
# shadow steps (rollout/plan.py).
SERVING_GATE = f"{GROUP}/serving"
RUN_AS = 1000

# Triton's ports, and the runtime sidecar's when it fronts Triton.
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
RUNTIME_PORTS = {"proxy-http": 8080, "proxy-grpc": 8081, "proxy-metrics": 9090}


@dataclass(frozen=True)
class BuildConfig:
    """Operator-wide inputs of the builders (from the operator's command line)."""

    runtime_image: str
    progress_deadline_seconds: int = 600
    startup_timeout_seconds: int = 900
    # A leaving pod keeps serving this long after it is marked for deletion, while the
    # endpoints controller and kube-proxy take it out of the Service; Triton stays two
    # seconds longer than the sidecar in front of it, so in-flight requests finish.
    drain_seconds: int = 5
    # The node-local model cache (a hostPath, content-addressed by digest) for oci:// models;
    # None: no cache. The folder must exist on the nodes, writable by the runtime's user.
    model_cache_dir: str | None = None
    model_cache_max_bytes: int = 100 * 2**30


def restricted_security_context(read_only_root: bool = True) -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def triton_resources(md: ModelDeployment) -> dict[str, Any]:
    resources = md.spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if resources.cpu is not None:
        requests["cpu"] = str(resources.cpu)
    if resources.memory is not None:
        requests["memory"] = str(resources.memory)
        limits["memory"] = str(resources.memory)
    if resources.gpu is not None:
        limits[GPU_RESOURCE] = str(resources.gpu.count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def node_selector(md: ModelDeployment) -> dict[str, str]:
    selector = dict(md.spec.placement.node_selector)
    gpu = md.spec.resources.gpu
    if gpu is not None and gpu.product:
        selector[GPU_PRODUCT_LABEL] = gpu.product
    return selector


def tolerations(md: ModelDeployment) -> list[dict[str, Any]]:
    user = [t.model_dump(by_alias=True, exclude_none=True) for t in md.spec.placement.tolerations]
    if md.spec.resources.gpu is None or GPU_TOLERATION in user:
        return user
    return [GPU_TOLERATION, *user]


def pvc_claim(md: ModelDeployment) -> str | None:
    """The claim of a ``pvc://<claim>/<path>`` storage URI."""
    scheme, _, rest = md.spec.model.storage_uri.partition("://")
    return rest.split("/", 1)[0] if scheme == "pvc" else None


def fetch_container(md: ModelDeployment, config: BuildConfig) -> dict[str, Any]:
    model = md.spec.model
    args = [
        "fetch",
        f"--storage-uri={model.storage_uri}",
        f"--model-name={model.name}",
        f"--model-version={model.version}",
        f"--format={model.format}",
        f"--repository={MODEL_REPOSITORY}",
    ]
    if model.config is not None:
        overrides = model.config.model_dump(mode="json", by_alias=True, exclude_none=True)
        args.append(f"--config-overrides={json.dumps(overrides, sort_keys=True)}")
    mounts: list[dict[str, Any]] = [
        {"name": "model-repository", "mountPath": MODEL_REPOSITORY},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir, not the host's /tmp
    ]
    if model.digest:
        args.append(f"--digest={model.digest}")
    if model.credentials_secret:
        args.append(f"--credentials-dir={CREDENTIALS_DIR}")
        mounts.append({"name": CREDENTIALS_VOLUME, "mountPath": CREDENTIALS_DIR, "readOnly": True})
    if pvc_claim(md) is not None:
        args.append(f"--pvc-root={PVC_ROOT}")
        mounts.append({"name": "model-source", "mountPath": PVC_ROOT, "readOnly": True})
    if model.plain_http:
        args.append("--plain-http")
    if uses_model_cache(md, config):
        args.append(f"--cache-dir={MODEL_CACHE}")
        args.append(f"--cache-max-bytes={config.model_cache_max_bytes}")
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE})
    return {
        "name": "fetch-model",
        "image": config.runtime_image,
        "args": args,
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
        "securityContext": restricted_security_context(),
        "volumeMounts": mounts,
    }


def is_archive(md: ModelDeployment) -> bool:
    """The model comes as an archive (oci://), with its manifest beside Triton's config."""
    return md.spec.model.storage_uri.startswith("oci://")


def uses_model_cache(md: ModelDeployment, config: BuildConfig) -> bool:
    return is_archive(md) and config.model_cache_dir is not None


def pinned_digest(md: ModelDeployment) -> str | None:
    """The archive's digest when the spec pins it (``@sha256:`` or ``spec.model.digest``): a
    tag's digest is known only once fetched, too late for the pod template."""
    _, at, digest = md.spec.model.storage_uri.partition("@")
    return digest if at and digest.startswith("sha256:") else md.spec.model.digest


CACHE_PREFERENCE_WEIGHT = 50  # of 100: a warm node wins over spreading, not over the user's


def pod_affinity(md: ModelDeployment, config: BuildConfig) -> dict[str, Any] | None:
    """The spec's affinity, plus a preference for nodes whose cache holds the pinned archive
    (the label the operator puts on them), so a new replica or a restarted one starts warm."""
    affinity = copy.deepcopy(md.spec.placement.affinity or {})
    digest = pinned_digest(md)
    if uses_model_cache(md, config) and digest is not None:
        preferred = affinity.setdefault("nodeAffinity", {}).setdefault(
            "preferredDuringSchedulingIgnoredDuringExecution", []
        )
        expression = {"key": cache_label(digest), "operator": "Exists"}
        preferred.append(
            {"weight": CACHE_PREFERENCE_WEIGHT, "preference": {"matchExpressions": [expression]}}
        )
    return affinity or None


def triton_container(md: ModelDeployment, config: BuildConfig) -> dict[str, Any]:
    server = md.spec.server
    fronted = md.spec.monitoring.runtime.enabled
    # The startup probe asks every second: a model's first Ready (a wake from zero, a
    # scale-up, a canary) comes within a second of Triton's, not up to a period later. It
    # stops once it succeeds; the readiness and liveness probes then keep their pace.
    period = 1
    args = [
        f"--model-repository={MODEL_REPOSITORY}",
        "--model-control-mode=none",
        f"--http-port={TRITON_PORTS['http']}",
        f"--grpc-port={TRITON_PORTS['grpc']}",
        f"--metrics-port={TRITON_PORTS['metrics']}",
    ]
    if fronted:
        # The sidecar is the only door: nothing outside the pod reaches Triton's ports.
        args += [f"--{api}-address=127.0.0.1" for api in ("http", "grpc", "metrics")]
        # kubelet probes the pod's address, so it asks the sidecar, which asks Triton. By
        # number: kubelet looks a port name up in the probed container's own ports only.
        ready = {"path": "/triton/ready", "port": RUNTIME_PORTS["proxy-metrics"]}
        live = {"path": "/triton/live", "port": RUNTIME_PORTS["proxy-metrics"]}
    else:
        ready = {"path": "/v2/health/ready", "port": "http"}
        live = {"path": "/v2/health/live", "port": "http"}
    container: dict[str, Any] = {
        "name": "triton",
        "image": server.image,
        "command": ["tritonserver"],
        "args": [*args, *server.args],
        "resources": triton_resources(md),
        # When Triton exits on an error (a model that does not load), the end of its log
        # becomes the termination message: status reports it as ModelLoadFailed.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "startupProbe": {
            "httpGet": dict(ready),
            "periodSeconds": period,
            "failureThreshold": max(1, config.startup_timeout_seconds // period),
        },
        "readinessProbe": {"httpGet": dict(ready), "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": live, "periodSeconds": 10, "failureThreshold": 6},
        "lifecycle": {"preStop": {"sleep": {"seconds": config.drain_seconds + 2}}},
        "securityContext": restricted_security_context(),
        "volumeMounts": [
            {"name": "model-repository", "mountPath": MODEL_REPOSITORY, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108 - an emptyDir
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir
        ],
    }
    if not fronted:
        container["ports"] = [
            {"name": name, "containerPort": port, "protocol": "TCP"}
            for name, port in TRITON_PORTS.items()
        ]
    if server.env:  # the API server drops empty lists; so do we, or every check sees drift
        container["env"] = [e.model_dump(by_alias=True, exclude_none=True) for e in server.env]
    return container


def runtime_container(md: ModelDeployment, track: Track, config: BuildConfig) -> dict[str, Any]:
    monitoring = md.spec.monitoring
    args = [
        "serve",
        f"--upstream-http=127.0.0.1:{TRITON_PORTS['http']}",
        f"--upstream-grpc=127.0.0.1:{TRITON_PORTS['grpc']}",
        f"--http-port={RUNTIME_PORTS['proxy-http']}",
        f"--grpc-port={RUNTIME_PORTS['proxy-grpc']}",
        f"--metrics-port={RUNTIME_PORTS['proxy-metrics']}",
        f"--model={md.spec.model.name}",
        f"--model-version={md.spec.model.version}",
        f"--track={track}",
        f"--sample-rate={monitoring.runtime.sample_rate}",
    ]
    mounts: list[dict[str, Any]] = []
    if monitoring.runtime.reference_profile is not None:
        args.append(f"--reference-profile={PROFILE_DIR}")
        mounts.append({"name": "reference-profile", "mountPath": PROFILE_DIR, "readOnly": True})
    elif is_archive(md):
        # Drift against the profile the archive carries, when it carries one.
        args.append(f"--archive-manifest={MODEL_REPOSITORY}/{md.spec.model.name}/{ARCHIVE_FILE}")
        mounts.append({"name": "model-repository", "mountPath": MODEL_REPOSITORY, "readOnly": True})
    auth = monitoring.auth
    if auth is not None and auth.api_key_secret is not None:
        args.append(f"--api-keys-dir={API_KEYS_DIR}")
        mounts.append({"name": API_KEYS_VOLUME, "mountPath": API_KEYS_DIR, "readOnly": True})
        # Keys' hashes in metrics are keyed by this object's uid: stable across its pods and
        # tracks, unrelated between ModelDeployments and installations.
        args.append(f"--client-salt={md.metadata.uid}")
    if auth is not None and auth.rate_limit_per_client:
        args.append(f"--rate-limit-per-client={auth.rate_limit_per_client}")
    if auth is not None and auth.query_budget is not None:
        budget = auth.query_budget
        args.append(f"--query-budget={budget.queries}/{budget.window}")
        args.append(f"--budget-file={BUDGETS_DIR}/{BUDGETS_KEY}")
        mounts.append({"name": "query-budgets", "mountPath": BUDGETS_DIR, "readOnly": True})
    if auth is not None and auth.outputs:
        rules = [o.model_dump(by_alias=True, exclude_none=True) for o in auth.outputs]
        args.append(f"--coarsen-outputs={json.dumps(rules, sort_keys=True)}")
    if monitoring.runtime.allow_admin_apis:
        args.append("--allow-admin-apis=true")
    # Every track reads it (the ConfigMap exists only for rollouts with shadow steps): a
    # stable pod started before the steps were added must still copy when one runs.
    args.append(f"--shadow-file={SHADOW_DIR}/{SHADOW_KEY}")
    mounts.append({"name": "shadow", "mountPath": SHADOW_DIR, "readOnly": True})
    container: dict[str, Any] = {
        "name": "runtime",
        "image": config.runtime_image,
        "args": args,
        "ports": [
            {"name": name, "containerPort": port, "protocol": "TCP"}
            for name, port in RUNTIME_PORTS.items()
        ],
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "512Mi"},
        },
        # Asked every second until the model first answers (a wake from zero waits on it),
        # then every 5 s.
        "startupProbe": {
            "httpGet": {"path": "/readyz", "port": "proxy-metrics"},
            "periodSeconds": 1,
            "failureThreshold": config.startup_timeout_seconds,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "proxy-metrics"},
            "periodSeconds": 5,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "proxy-metrics"},
            "periodSeconds": 10,
        },
        "lifecycle": {"preStop": {"sleep": {"seconds": config.drain_seconds}}},
        "securityContext": restricted_security_context(),
    }
    if mounts:
        container["volumeMounts"] = mounts
    return container


def volumes(md: ModelDeployment, config: BuildConfig) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": "model-repository", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if uses_model_cache(md, config):
        # Created by kubelet when missing (root's, so the fetcher goes without it and says so).
        cache = {"path": config.model_cache_dir, "type": "DirectoryOrCreate"}
        out.append({"name": "model-cache", "hostPath": cache})
    if (claim := pvc_claim(md)) is not None:
        out.append(
            {
                "name": "model-source",
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
        )
    if md.spec.model.credentials_secret:
        out.append(
            {
                "name": CREDENTIALS_VOLUME,
                "secret": {"secretName": md.spec.model.credentials_secret, "defaultMode": 0o440},
            }
        )
    monitoring = md.spec.monitoring
    if monitoring.runtime.enabled and monitoring.runtime.reference_profile is not None:
        name = monitoring.runtime.reference_profile.config_map_ref.name
        out.append({"name": "reference-profile", "configMap": {"name": name}})
    if monitoring.runtime.enabled and monitoring.auth and monitoring.auth.api_key_secret:
        secret = monitoring.auth.api_key_secret.name
        out.append(
            {"name": API_KEYS_VOLUME, "secret": {"secretName": secret, "defaultMode": 0o440}}
        )
    if monitoring.runtime.enabled and monitoring.auth and monitoring.auth.query_budget:
        # Optional: pods start before the operator first sums the budgets.
        name = budget_configmap_name(md)
        out.append({"name": "query-budgets", "configMap": {"name": name, "optional": True}})
    if monitoring.runtime.enabled:
        # Optional: only rollouts with shadow steps have one.
        name = shadow_configmap_name(md)
        out.append({"name": "shadow", "configMap": {"name": name, "optional": True}})
    return out


def pod_spec(md: ModelDeployment, track: Track, config: BuildConfig) -> dict[str, Any]:
    placement = md.spec.placement
    containers = [triton_container(md, config)]
    if md.spec.monitoring.runtime.enabled:
        containers.append(runtime_container(md, track, config))
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [fetch_container(md, config)],
        "containers": containers,
        "volumes": volumes(md, config),
        "terminationGracePeriodSeconds": 30,
    }
    if selector := node_selector(md):
        spec["nodeSelector"] = selector
    if tolerated := tolerations(md):
        spec["tolerations"] = tolerated
    if affinity := pod_affinity(md, config):
        spec["affinity"] = affinity
    if placement.priority_class_name:
        spec["priorityClassName"] = placement.priority_class_name
    if placement.topology_spread_constraints:
        spec["topologySpreadConstraints"] = placement.topology_spread_constraints
    if track == "canary" and md.spec.shadow_steps():
        spec["readinessGates"] = [{"conditionType": SERVING_GATE}]
    return spec


def surge_strategy(md: ModelDeployment) -> dict[str, Any]:
    """Roll without losing capacity, surging only as many pods as spare GPUs allow
    (``ModelDeploymentSpec.surge``)."""
    extra, missing = md.spec.surge()
    return {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": extra, "maxUnavailable": missing},
    }


def build_deployment(
    md: ModelDeployment,
    track: Track,
    revision: str,
    config: BuildConfig,
    replicas: int | None = None,
) -> dict[str, Any]:
    """The Deployment ``<name>-<track>`` with ``replicas`` (a canary's share) or the whole
    count. Autoscalers act on the ModelDeployment's scale subresource, never on Deployments.
    """
    labels = track_labels(md, track, revision)
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(md, track)},
        "strategy": surge_strategy(md),
        "revisionHistoryLimit": 3,
        "progressDeadlineSeconds": config.progress_deadline_seconds,
        "template": {"metadata": {"labels": labels}, "spec": pod_spec(md, track, config)},
    }
    spec["replicas"] = md.spec.desired_replicas() if replicas is None else replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(md, deployment_name(md, track), dict(labels)),
        "spec": spec,
    }
