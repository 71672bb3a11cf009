"""ModelDeployment v1alpha1: the one definition of the API.

The CRD in ``crds/`` is generated from these models (``make crds``), including the CEL rules
attached with :func:`cel`; the operator parses objects with the same models. Field names are
camelCase on the wire (aliases) and snake_case in Python.

Validation lives in the API server, so rules here must be expressible as OpenAPI or CEL.
Every CEL message starts with the field it is about and says what is allowed.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "serving.modeldeploy.io"
VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ("md",)
API_VERSION = f"{GROUP}/{VERSION}"

# Triton 2.51 (NGC 24.10): the release the local test server (nvidia-pytriton) ships.
DEFAULT_TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
MAX_NAME_LENGTH = 45  # leaves room for "-canary" and a pod suffix within 63 characters
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # DNS-1035: it names the Service too

DURATION_PATTERN = r"^([0-9]+([.][0-9]+)?(ms|s|m|h))+$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
STORAGE_SCHEMES = ("s3", "gs", "pvc", "https", "hf", "oci")
StorageFormat = Literal[
    "onnx", "tensorrt_plan", "pytorch_libtorch", "tensorflow_savedmodel", "python"
]


DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Durations that set how often a loop queries or acts are at least this long (CEL).
MIN_LOOP_INTERVAL = "1s"
DEFAULT_SCALING_INTERVAL = "15s"  # the HPA controller's default sync period
MAX_ACTIVATION_ADDRESSES = 16  # status.activation.addresses: enough to spread held requests
DEFAULT_TOLERANCE_PERCENT = 10  # the HPA controller's default tolerance


def parse_duration(text: str) -> float:
    """``1m30s`` -> 90.0 (the API server already checked the format)."""
    return sum(float(n) * DURATION_UNITS[u] for n, u in re.findall(r"([0-9.]+)(ms|s|m|h)", text))


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One ``x-kubernetes-validations`` entry."""
    entry = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def rules(*entries: dict[str, str]) -> dict[str, Any]:
    """``json_schema_extra`` carrying CEL rules for a model or a field."""
    return {"x-kubernetes-validations": list(entries)}


def duration_rule(
    path: str, extra: str = "", minimum: str | None = None, why: str = ""
) -> dict[str, Any]:
    """A duration (or ``extra``); with ``minimum``, at least that long (a second rule, so each
    message says the one thing that is wrong; ``why`` ends it)."""
    allowed = "a duration such as 500ms, 30s, 5m or 1h"
    check = f"self.matches('{DURATION_PATTERN}')"
    entries = [
        cel(f"self == '{extra}' || {check}", f"{path} must be '{extra}' or {allowed}")
        if extra
        else cel(check, f"{path} must be {allowed}")
    ]
    if minimum is not None:
        # Only a well-formed duration reaches duration(): the first rule reports the others.
        skip = f"self == '{extra}' || !{check}" if extra else f"!{check}"
        entries.append(
            cel(
                f"{skip} || duration(self) >= duration('{minimum}')",
                f"{path} must be at least {minimum}{': ' + why if why else ''}",
            )
        )
    return rules(*entries)


def object_name_rule(path: str) -> dict[str, Any]:
    return rules(
        cel(
            f"self.matches('{DNS_SUBDOMAIN_PATTERN}')",
            f"{path} must be a Kubernetes object name: lowercase letters, digits, '-' and '.'",
        )
    )


def quantity_rule(path: str) -> dict[str, Any]:
    return {
        "x-kubernetes-int-or-string": True,
        **rules(
            cel(
                "type(self) == int ? self > 0"
                " : isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
                f"{path} must be a positive Kubernetes quantity such as 4, 500m or 16Gi",
            )
        ),
    }


FREE_FORM: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}


class ApiModel(BaseModel):
    """camelCase on the wire, unknown fields rejected when parsing in Python."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


# -- spec.model ---------------------------------------------------------------------------


class DynamicBatching(ApiModel):
    preferred_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        max_length=16,
        description="Batch sizes the dynamic batcher prefers to form.",
    )
    max_queue_delay_microseconds: int | None = Field(
        default=None, ge=0, le=10_000_000, description="How long a request may wait for a batch."
    )


class TritonConfig(ApiModel):
    """Overrides written into the model's config.pbtxt."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!has(self.dynamicBatching) || (has(self.maxBatchSize) && self.maxBatchSize > 0)",
                "spec.model.config.dynamicBatching needs spec.model.config.maxBatchSize > 0",
            ),
            cel(
                "!has(self.dynamicBatching) || !has(self.maxBatchSize)"
                " || !has(self.dynamicBatching.preferredBatchSizes)"
                " || self.dynamicBatching.preferredBatchSizes.all(b, b <= self.maxBatchSize)",
                "spec.model.config.dynamicBatching.preferredBatchSizes must not exceed"
                " maxBatchSize",
            ),
        )
    )

    max_batch_size: int | None = Field(
        default=None, ge=0, le=65536, description="0 disables batching."
    )
    dynamic_batching: DynamicBatching | None = None
    instance_count: int | None = Field(
        default=None, ge=1, le=64, description="Model instances per GPU (instance_group count)."
    )


class ModelSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!has(self.plainHTTP) || !self.plainHTTP || self.storageUri.startsWith('oci://')",
                "spec.model.plainHTTP applies to oci:// registries only",
                ".plainHTTP",
            ),
        )
    )

    name: str = Field(
        max_length=128,
        description="The Triton model name, which clients call (/v2/models/<name>/infer);"
        " immutable: a new name is a new ModelDeployment.",
        json_schema_extra=rules(
            cel(
                "self.matches('^[a-zA-Z0-9][a-zA-Z0-9_.-]*$')",
                "spec.model.name must be letters, digits, '_', '.' or '-', starting with a letter"
                " or digit",
            ),
            # A canary of another name would answer nobody's calls, and clients calling the
            # old one would get 404s once it is promoted.
            cel(
                "self == oldSelf",
                "spec.model.name is immutable (clients call the model by it): create a new"
                " ModelDeployment for a new name",
            ),
        ),
    )
    version: str = Field(
        max_length=18,
        description='The Triton model version, a positive integer such as "3".',
        json_schema_extra=rules(
            cel(
                "self.matches('^[1-9][0-9]*$')",
                'spec.model.version must be a positive integer such as "3"',
            )
        ),
    )
    storage_uri: str = Field(
        max_length=2048,
        description="Where the model repository lives: "
        + ", ".join(f"{s}://" for s in STORAGE_SCHEMES),
        json_schema_extra=rules(
            cel(
                f"self.matches('^({'|'.join(STORAGE_SCHEMES)})://.+')",
                "spec.model.storageUri must start with one of "
                + ", ".join(f"{s}://" for s in STORAGE_SCHEMES),
            )
        ),
    )
    format: StorageFormat = Field(description="The Triton backend the model needs.")
    credentials_secret: str | None = Field(
        default=None,
        max_length=253,
        json_schema_extra=object_name_rule("spec.model.credentialsSecret"),
        description="A Secret mounted only into the model fetcher, never into Triton.",
    )
    digest: str | None = Field(
        default=None,
        max_length=71,
        pattern=r"^sha256:[a-f0-9]{64}$",
        description="The model's content, checked by the fetcher before Triton sees it:"
        " sha256 of the file, or of a folder's manifest (`modeldeploy-runtime digest PATH`"
        " prints it); for oci:// the archive's manifest digest (prefer `oci://...@sha256:`)."
        " A mismatch fails the fetch (ModelFetchFailed).",
    )
    plain_http: bool | None = Field(
        default=None,
        alias="plainHTTP",
        description="oci:// only: the registry speaks plain http (a registry inside the"
        " cluster); https otherwise.",
    )
    config: TritonConfig | None = None


# -- spec.server ----------------------------------------------------------------------------


MAX_ENV_VALUE = 8192  # 128 of them: 1 MiB, within etcd's 1.5 MiB for each child that copies them


class EnvVar(ApiModel):
    name: str = Field(max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = Field(default=None, max_length=MAX_ENV_VALUE)
    value_from: dict[str, Any] | None = Field(
        default=None, description="A core/v1 EnvVarSource.", json_schema_extra=FREE_FORM
    )


OPERATOR_OWNED_ARGS = (
    "--model-repository",
    "--model-store",
    "--model-control-mode",
    "--http-address",
    "--grpc-address",
    "--metrics-address",
)


class ServerSpec(ApiModel):
    image: str = Field(
        default=DEFAULT_TRITON_IMAGE,
        max_length=512,
        min_length=1,
        description="The Triton Inference Server image; pinned by default.",
    )
    args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list,
        max_length=64,
        description="Extra tritonserver arguments.",
        json_schema_extra={
            **rules(
                cel(
                    "self.all(a, "
                    + " && ".join(f"!a.startsWith('{arg}')" for arg in OPERATOR_OWNED_ARGS)
                    + ")",
                    "spec.server.args must not set "
                    + ", ".join(OPERATOR_OWNED_ARGS)
                    + ": the operator owns them",
                )
            ),
        },
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=128)


# -- spec.resources -------------------------------------------------------------------------


class GpuSpec(ApiModel):
    count: int = Field(ge=1, le=16, description="GPUs per replica (nvidia.com/gpu).")
    product: str | None = Field(
        default=None,
        max_length=128,
        pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$",
        description="The node label nvidia.com/gpu.product, e.g. NVIDIA-A100-SXM4-80GB.",
    )


class ResourcesSpec(ApiModel):
    gpu: GpuSpec | None = None
    cpu: int | str | None = Field(
        default=None, json_schema_extra=quantity_rule("spec.resources.cpu")
    )
    memory: int | str | None = Field(
        default=None, json_schema_extra=quantity_rule("spec.resources.memory")
    )


# -- spec.placement -------------------------------------------------------------------------


class Toleration(ApiModel):
    key: str | None = Field(default=None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class PlacementSpec(ApiModel):
    node_selector: dict[str, str] = Field(
        default_factory=dict, json_schema_extra={"maxProperties": 32}
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    affinity: dict[str, Any] | None = Field(
        default=None, description="A core/v1 Affinity.", json_schema_extra=FREE_FORM
    )
    priority_class_name: str | None = Field(
        default=None,
        max_length=253,
        json_schema_extra=object_name_rule("spec.placement.priorityClassName"),
    )
    topology_spread_constraints: list[
        Annotated[dict[str, Any], Field(json_schema_extra=FREE_FORM)]
    ] = Field(default_factory=list, max_length=8, description="core/v1 TopologySpreadConstraints.")


class PrometheusRef(ApiModel):
    url: str = Field(
        max_length=2048,
        json_schema_extra=rules(
            cel(
                "self.matches('^https?://.+')",
                "prometheus.url (spec.rollout.analysis or spec.autoscaling) must be an http:// or"
                " https:// URL",
            )
        ),
    )


# -- spec.autoscaling (autoscaling/) -------------------------------------------------------

LATENCY_METRICS = ("P99Latency", "QueueTime")
PERCENT_METRICS = ("GPUUtilization", "CPUUtilization")
NUMBER_PATTERN = r"^[0-9]+([.][0-9]+)?$"
ScalingMetricType = Literal[
    "InFlightPerReplica",
    "RPSPerReplica",
    "P99Latency",
    "QueueTime",
    "GPUUtilization",
    "CPUUtilization",
    "Custom",
]


class ScalingMetric(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!(self.type in ['P99Latency', 'QueueTime'])"
                f" || (type(self.target) == string && self.target.matches('{DURATION_PATTERN}'))",
                "spec.autoscaling.metrics[].target must be a duration such as 250ms for"
                " P99Latency and QueueTime",
                ".target",
            ),
            cel(
                "self.type in ['P99Latency', 'QueueTime']"
                " || (type(self.target) == int ? self.target > 0"
                f" : self.target.matches('{NUMBER_PATTERN}') && double(self.target) > 0.0)",
                "spec.autoscaling.metrics[].target must be a positive number such as 4 or '0.5'"
                " for InFlightPerReplica, RPSPerReplica, GPUUtilization, CPUUtilization and"
                " Custom",
                ".target",
            ),
            cel(
                "self.type != 'GPUUtilization' || type(self.target) != int || self.target <= 100",
                "spec.autoscaling.metrics[].target is a percentage for GPUUtilization: 1-100",
                ".target",
            ),
            cel(
                "(self.type == 'Custom') == has(self.query)",
                "spec.autoscaling.metrics[].query is required for type Custom and allowed only"
                " there",
                ".query",
            ),
        )
    )

    type: ScalingMetricType = Field(
        description="Per replica: InFlightPerReplica, RPSPerReplica (desired = total / target);"
        " ratio: P99Latency, QueueTime, GPUUtilization, CPUUtilization, Custom"
        " (desired = current x value / target)."
    )
    target: int | str = Field(
        json_schema_extra={"x-kubernetes-int-or-string": True, "maxLength": 32}
    )
    name: str | None = Field(
        default=None,
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
        description="Names a Custom metric in status and Events.",
    )
    query: str | None = Field(
        default=None,
        max_length=4096,
        min_length=1,
        description="PromQL returning one number, for type Custom; $namespace, $name and"
        " $selector are substituted.",
    )


class ScalingBehavior(ApiModel):
    scale_up_stabilization: str = Field(
        default="0s",
        max_length=32,
        description="Scale up only to the lowest recommendation of this window.",
        json_schema_extra=duration_rule("spec.autoscaling.behavior.scaleUpStabilization"),
    )
    scale_down_stabilization: str = Field(
        default="300s",
        max_length=32,
        description="Scale down only to the highest recommendation of this window.",
        json_schema_extra=duration_rule("spec.autoscaling.behavior.scaleDownStabilization"),
    )
    max_scale_up_step: int | None = Field(
        default=None, ge=1, le=1000, description="At most this many replicas added at once."
    )
    max_scale_down_step: int | None = Field(
        default=None, ge=1, le=1000, description="At most this many replicas removed at once."
    )
    tolerance_percent: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="No change while every metric is within this percent of its target"
        f" (default {DEFAULT_TOLERANCE_PERCENT}). Engine builtin only: the HPA's tolerance is"
        " the cluster's (--horizontal-pod-autoscaler-tolerance).",
    )

    def tolerance(self) -> float:
        """The tolerance as a fraction: 0.1 for 10 %."""
        percent = self.tolerance_percent
        return (DEFAULT_TOLERANCE_PERCENT if percent is None else percent) / 100


class ScaleToZero(ApiModel):
    enabled: bool = False
    idle_after: str = Field(
        default="10m",
        max_length=32,
        description="Scale to 0 after this long without requests.",
        json_schema_extra=duration_rule(
            "spec.autoscaling.scaleToZero.idleAfter",
            minimum=MIN_LOOP_INTERVAL,
            why="it is the window of the query that finds no requests",
        ),
    )
    wake_timeout: str = Field(
        default="10m",
        max_length=32,
        description="How long the activator holds a request for a ModelDeployment at zero"
        " while it wakes (a GPU node provisioned, the model fetched and loaded); past it the"
        " caller gets 503 with Retry-After.",
        json_schema_extra=duration_rule(
            "spec.autoscaling.scaleToZero.wakeTimeout",
            minimum="1s",
            why="a model cannot be woken faster",
        ),
    )
    max_held_requests: int = Field(
        default=100,
        ge=1,
        le=10000,
        description="Requests the activator holds at once per activator replica while it"
        " wakes; more get 503 with Retry-After.",
    )


class AutoscalingSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "self.minReplicas <= self.maxReplicas",
                "spec.autoscaling.minReplicas must be less than or equal to maxReplicas",
                ".minReplicas",
            ),
            cel(
                "self.metrics.all(m, m.type == 'Custom'"
                " || self.metrics.exists_one(n, n.type == m.type))",
                "spec.autoscaling.metrics must name each metric type at most once",
                ".metrics",
            ),
            cel(
                "self.engine != 'hpa' || self.metrics.all(m, m.type != 'Custom')",
                "spec.autoscaling.metrics[].type Custom needs engine builtin or keda: an HPA"
                " reads only the metrics the Prometheus Adapter rules define",
                ".metrics",
            ),
            cel(
                "self.engine != 'hpa' || !has(self.scaleToZero) || !self.scaleToZero.enabled",
                "spec.autoscaling.scaleToZero needs engine builtin or keda: an HPA cannot scale"
                " to 0 without an alpha feature gate",
                ".scaleToZero",
            ),
            cel(
                "self.engine != 'hpa' || !has(self.interval)",
                "spec.autoscaling.interval applies to engines builtin and keda: an HPA is"
                " evaluated at the cluster's sync period"
                " (kube-controller-manager --horizontal-pod-autoscaler-sync-period)",
                ".interval",
            ),
            cel(
                "self.engine == 'builtin' || !has(self.behavior)"
                " || !has(self.behavior.tolerancePercent)",
                "spec.autoscaling.behavior.tolerancePercent applies only to engine builtin: an"
                " HPA, and KEDA's, use the cluster's tolerance"
                " (kube-controller-manager --horizontal-pod-autoscaler-tolerance, 10 %)",
                ".behavior.tolerancePercent",
            ),
        )
    )

    engine: Literal["builtin", "hpa", "keda"] = "builtin"
    min_replicas: int = Field(default=1, ge=1, le=1000)
    max_replicas: int = Field(ge=1, le=1000)
    metrics: list[ScalingMetric] = Field(min_length=1, max_length=8)
    interval: str | None = Field(
        default=None,
        max_length=32,
        description="How often the builtin engine evaluates, or KEDA polls (default"
        f" {DEFAULT_SCALING_INTERVAL}, the HPA's sync period). Not for engine hpa.",
        json_schema_extra=duration_rule(
            "spec.autoscaling.interval",
            minimum=MIN_LOOP_INTERVAL,
            why="it sets how often metrics are queried",
        ),
    )
    behavior: ScalingBehavior = Field(default_factory=ScalingBehavior)
    scale_to_zero: ScaleToZero | None = None
    prometheus: PrometheusRef | None = Field(
        default=None, description="Where metrics are queried; the operator's default if unset."
    )

    def interval_seconds(self) -> float:
        return parse_duration(self.interval or DEFAULT_SCALING_INTERVAL)

    def floor(self) -> int:
        """The lowest count the autoscaler may choose: 0 with scale to zero."""
        return 0 if self.scale_to_zero and self.scale_to_zero.enabled else self.min_replicas


# -- spec.rollout (canary rollouts: rollout/plan.py, rollout/decide.py) -------------------


class ShadowStep(ApiModel):
    percent: int = Field(
        ge=1,
        le=100,
        description="Percent of stable's inference calls copied to the canary, whose answers"
        " are compared with stable's; the canary serves no user.",
    )


class CanaryStep(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "has(self.weight) != has(self.shadow)",
                "spec.rollout.steps[] must set exactly one of weight or shadow",
            )
        )
    )

    weight: int | None = Field(
        default=None, ge=1, le=100, description="Percent of traffic on the canary."
    )
    shadow: ShadowStep | None = Field(
        default=None,
        description="A shadow step: the canary takes no user traffic; stable's sidecars copy"
        " a share of requests to it and compare its answers (docs/rollout.md#shadow-steps).",
    )
    pause: str | None = Field(
        default=None,
        max_length=32,
        description="How long to hold this step: a duration, or 'manual' to wait for promote.",
        json_schema_extra=duration_rule("spec.rollout.steps[].pause", extra="manual"),
    )


class GatewayRouting(ApiModel):
    parent_refs: list[Annotated[dict[str, Any], Field(json_schema_extra=FREE_FORM)]] = Field(
        min_length=1, max_length=16
    )
    hostnames: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list, max_length=16
    )


class TrafficRouting(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "has(self.replicas) != has(self.gatewayAPI)",
                "spec.rollout.trafficRouting must set exactly one of replicas or gatewayAPI",
            )
        )
    )

    replicas: dict[str, Any] | None = Field(
        default=None,
        description="Split traffic by the ratio of stable to canary replicas.",
        json_schema_extra={"type": "object", "maxProperties": 0},
    )
    gateway_api: GatewayRouting | None = Field(default=None, alias="gatewayAPI")


class AnalysisMetric(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "has(self.builtin) != has(self.query)",
                "spec.rollout.analysis.metrics[] must set exactly one of builtin or query",
            ),
            cel(
                "has(self.min) || has(self.max)",
                "spec.rollout.analysis.metrics[] must set min, max or both",
            ),
            cel(
                "!has(self.min) || !has(self.max) || self.min <= self.max",
                "spec.rollout.analysis.metrics[].min must be less than or equal to max",
                ".min",
            ),
        )
    )

    name: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)
    builtin: (
        Literal[
            "P99Latency",
            "RelativeP99Latency",
            "ErrorRatio",
            "DriftScore",
            "QueueTime",
            "OutputDisagreement",
            "OutputError",
            "ShadowLatencyRatio",
            "ShadowErrorRatio",
        ]
        | None
    ) = Field(
        default=None,
        description="RelativeP99Latency: canary p99 over stable p99. During shadow steps,"
        " on the same mirrored requests: OutputDisagreement (rows whose class differs, the"
        " worst output), OutputError (mean relative error, the worst output),"
        " ShadowLatencyRatio (canary p99 over stable p99), ShadowErrorRatio (the canary's"
        " failures on inputs stable answered).",
    )
    query: str | None = Field(default=None, max_length=4096, min_length=1)
    min: float | None = None
    max: float | None = None


class AnalysisSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "has(self.metrics) && size(self.metrics) > 0",
                "spec.rollout.analysis.metrics must name at least one metric: an analysis"
                " without metrics checks nothing",
                ".metrics",
            ),
            cel(
                "!has(self.metrics)"
                " || self.metrics.all(m, self.metrics.exists_one(n, n.name == m.name))",
                "spec.rollout.analysis.metrics names must be unique",
                ".metrics",
            ),
        )
    )

    interval: str = Field(
        default="30s",
        max_length=32,
        json_schema_extra=duration_rule(
            "spec.rollout.analysis.interval",
            minimum=MIN_LOOP_INTERVAL,
            why="it sets how often the canary's metrics are queried",
        ),
    )
    failure_limit: int = Field(
        default=2,
        ge=0,
        le=100,
        description="Failed checks over the whole rollout that roll the canary back."
        " Inconclusive checks (no data) do not count: the step waits for a passed one.",
    )
    inconclusive_limit: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Inconclusive checks in a row (no data: Prometheus down, a query that"
        " finds nothing) after which onInconclusive acts; 0 waits for data as long as it"
        " takes.",
    )
    on_inconclusive: Literal["Pause", "Rollback"] = Field(
        default="Pause",
        description="What inconclusiveLimit inconclusive checks in a row do: Pause (for a"
        " user to resume, promote or abort, as Argo Rollouts pauses) or Rollback.",
    )
    prometheus: PrometheusRef | None = None
    metrics: list[AnalysisMetric] = Field(default_factory=list, max_length=16)


class RolloutSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!has(self.steps) || self.steps.filter(s, has(s.weight)).map(s, s.weight)"
                ".isSorted() && self.steps.filter(s, has(s.weight)).all(a,"
                " self.steps.filter(s, has(s.weight)).exists_one(b, b.weight == a.weight))",
                "spec.rollout.steps weights must strictly increase, each within (0, 100]",
                ".steps",
            ),
            cel(
                "!has(self.steps) || self.steps.map(s, has(s.weight)).isSorted()",
                "spec.rollout.steps: shadow steps come before any weighted step (once users"
                " are served by the canary, there is nothing left to shadow)",
                ".steps",
            ),
            cel(
                "self.strategy == 'Canary' || !has(self.steps) || size(self.steps) == 0",
                "spec.rollout.steps apply only to strategy Canary",
                ".steps",
            ),
            cel(
                "self.strategy == 'Canary' || !has(self.analysis)",
                "spec.rollout.analysis applies only to strategy Canary: a Rolling update is"
                " not analysed",
                ".analysis",
            ),
        )
    )

    strategy: Literal["Canary", "Rolling"] = "Canary"
    max_surge_gpus: int | None = Field(default=None, ge=0, le=128, alias="maxSurgeGPUs")
    steps: list[CanaryStep] = Field(default_factory=list, max_length=20)
    traffic_routing: TrafficRouting | None = None
    analysis: AnalysisSpec | None = None


# -- spec.monitoring (the runtime sidecar's settings) --------------------------------------


class LocalObjectRef(ApiModel):
    name: str = Field(max_length=253, json_schema_extra=object_name_rule("name"))


class ReferenceProfile(ApiModel):
    config_map_ref: LocalObjectRef


class RuntimeSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "self.enabled || !has(self.referenceProfile)",
                "spec.monitoring.runtime.referenceProfile needs spec.monitoring.runtime.enabled:"
                " drift is measured by the runtime sidecar",
                ".referenceProfile",
            ),
            cel(
                "self.enabled || !has(self.allowAdminApis) || !self.allowAdminApis",
                "spec.monitoring.runtime.allowAdminApis needs spec.monitoring.runtime.enabled:"
                " without the sidecar nothing stands in front of Triton's APIs",
                ".allowAdminApis",
            ),
        )
    )

    enabled: bool = True
    sample_rate: float = Field(default=0.1, ge=0, le=1)
    reference_profile: ReferenceProfile | None = None
    allow_admin_apis: bool = Field(
        default=False,
        description="Let keyed clients call Triton's repository, trace, logging and"
        " shared-memory APIs through the sidecar; refused (403, PERMISSION_DENIED) otherwise.",
    )


class OutputCoarsening(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "has(self.decimals) || has(self.topK)",
                "spec.monitoring.auth.outputs[*] needs decimals, topK or both",
            )
        )
    )

    name: str = Field(min_length=1, max_length=128, description="A model output's name.")
    decimals: int | None = Field(
        default=None, ge=0, le=8, description="Round every value to this many decimals."
    )
    top_k: int | None = Field(
        default=None,
        ge=1,
        le=100000,
        description="Keep the k largest values of each row; the others become 0.",
    )


class QueryBudgetSpec(ApiModel):
    queries: int = Field(ge=1, le=10**12, description="Inference calls per API key per window.")
    window: str = Field(
        default="24h",
        max_length=16,
        pattern=r"^[1-9][0-9]*[smhd]$",
        description="A sliding window: 24h, 7d, 30m.",
    )


class AuthSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!has(self.queryBudget) || has(self.apiKeySecret)",
                "spec.monitoring.auth.queryBudget needs spec.monitoring.auth.apiKeySecret:"
                " budgets are counted per API key",
                ".queryBudget",
            )
        )
    )

    api_key_secret: LocalObjectRef | None = None
    rate_limit_per_client: str | None = Field(
        default=None,
        max_length=32,
        json_schema_extra=rules(
            cel(
                "self.matches('^[1-9][0-9]*/(s|m|h)$')",
                "spec.monitoring.auth.rateLimitPerClient must look like 100/s, 600/m or 1000/h",
            )
        ),
    )
    query_budget: QueryBudgetSpec | None = Field(
        default=None,
        description="Inference calls per key over a sliding window, summed over every replica"
        " (through Prometheus, so it needs a Prometheus URL); past it, 429.",
    )
    outputs: list[OutputCoarsening] = Field(
        default_factory=list,
        max_length=32,
        description="Coarsened outputs: rounded or cut to the top k, against model extraction.",
    )


class MonitoringSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!has(self.auth) || !has(self.runtime) || !has(self.runtime.enabled)"
                " || self.runtime.enabled",
                "spec.monitoring.auth needs spec.monitoring.runtime.enabled: API keys and rate"
                " limits are enforced by the runtime sidecar",
                ".auth",
            )
        )
    )

    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    auth: AuthSpec | None = None


# -- spec -----------------------------------------------------------------------------------


class ModelDeploymentSpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!has(self.autoscaling)"
                " || self.autoscaling.metrics.all(m, m.type != 'CPUUtilization')"
                " || has(self.resources) && has(self.resources.cpu)",
                "spec.autoscaling.metrics[].type CPUUtilization needs spec.resources.cpu:"
                " utilisation is measured against the request",
                ".autoscaling.metrics",
            ),
            cel(
                "!has(self.autoscaling)"
                " || self.autoscaling.metrics.all(m, m.type != 'GPUUtilization')"
                " || has(self.resources) && has(self.resources.gpu)",
                "spec.autoscaling.metrics[].type GPUUtilization needs spec.resources.gpu",
                ".autoscaling.metrics",
            ),
            cel(
                "!has(self.rollout) || !has(self.rollout.steps)"
                " || !self.rollout.steps.exists(s, has(s.shadow))"
                " || !has(self.monitoring) || !has(self.monitoring.runtime)"
                " || !has(self.monitoring.runtime.enabled) || self.monitoring.runtime.enabled",
                "spec.rollout.steps[].shadow needs spec.monitoring.runtime.enabled: stable's"
                " sidecars copy the requests and compare the answers",
                ".rollout.steps",
            ),
        )
    )

    def shadow_steps(self) -> bool:
        """The rollout has shadow steps: the canary's pods wait behind a readiness gate
        and every sidecar reads ``<name>-shadow``."""
        rollout = self.rollout
        return rollout is not None and any(s.shadow is not None for s in rollout.steps)

    model: ModelSpec
    server: ServerSpec = Field(default_factory=ServerSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    placement: PlacementSpec = Field(default_factory=PlacementSpec)
    replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Replica count. Under spec.autoscaling it is the autoscaler's current"
        " choice (written through the scale subresource), kept within its bounds. Always"
        " present, so the scale subresource (and an HPA) can read it.",
    )
    autoscaling: AutoscalingSpec | None = None
    rollout: RolloutSpec | None = None
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)

    def desired_replicas(self) -> int:
        """The total count over both tracks: the spec's, or under autoscaling the autoscaler's
        choice within [minReplicas (0 with scale to zero), maxReplicas]."""
        scaling = self.autoscaling
        if scaling is None:
            return self.replicas
        return min(max(self.replicas, scaling.floor()), scaling.max_replicas)

    def surge(self) -> tuple[int, int]:
        """(extra pods, missing pods) a rollout may run with, as a Deployment's maxSurge and
        maxUnavailable: one extra pod by default; ``spec.rollout.maxSurgeGPUs`` caps the extra
        GPUs, and with less than one replica's worth a pod goes before its successor comes."""
        gpu, rollout = self.resources.gpu, self.rollout
        extra = 1
        if gpu is not None and rollout is not None and rollout.max_surge_gpus is not None:
            extra = rollout.max_surge_gpus // gpu.count
        return (extra, 0) if extra > 0 else (0, 1)


# -- status ---------------------------------------------------------------------------------


Phase = Literal["Pending", "Progressing", "Available", "Degraded", "Failed"]
ConditionStatus = Literal["True", "False", "Unknown"]


class StatusModel(ApiModel):
    """Status parts ignore fields they do not know: a newer operator may have written them
    (an operator rolled back, or two versions during an upgrade), and the object must still
    be reconciled. The status patch only names fields this version knows, so theirs stay."""

    model_config = ConfigDict(extra="ignore")


class Condition(StatusModel):
    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    observed_generation: int | None = None
    last_transition_time: str | None = None


class TrackStatus(StatusModel):
    version: str | None = None
    revision: str | None = None
    digest: str | None = Field(
        default=None,
        description="The model content this track's pods serve, as their fetchers reported it:"
        " an oci:// archive's manifest digest, or spec.model.digest once checked.",
    )
    weight: int | None = Field(default=None, description="Traffic percent actually achieved.")
    shadow: int | None = Field(
        default=None,
        description="In a shadow step: the percent of stable's requests copied to the canary"
        " (which serves no user: weight 0).",
    )
    step: int | None = None
    failed_checks: int | None = None
    inconclusive_checks: int | None = Field(
        default=None,
        description="Inconclusive analyses in a row (spec.rollout.analysis.inconclusiveLimit).",
    )
    passed_checks: int | None = Field(
        default=None, description="Passed analyses in this step since its last failed one."
    )
    started: float | None = Field(default=None, description="Epoch seconds.")
    step_started: float | None = Field(default=None, description="Epoch seconds.")
    last_analysis: float | None = Field(default=None, description="Epoch seconds.")
    ready_since: float | None = Field(
        default=None,
        description="When this step's canary pods were all Ready (epoch seconds); the step's"
        " pause and analyses count from here.",
    )
    paused: bool | None = None


class RollbackStatus(StatusModel):
    """The revision that failed its rollout; not retried until the spec changes."""

    revision: str
    reason: str
    message: str = ""


class AnalysisResult(StatusModel):
    name: str
    value: float | None = None
    min: float | None = None
    max: float | None = None
    result: Literal["Passed", "Failed", "Inconclusive"]
    time: str | None = None
    detail: str | None = Field(
        default=None,
        description="Where the value comes from, when a metric has parts: the shadow"
        " builtins' worst output, e.g. 'output probabilities'.",
    )


class HistoryEntry(StatusModel):
    version: str
    revision: str
    result: str  # Promoted, RolledBack or Aborted
    storage_uri: str | None = None
    digest: str | None = None
    image: str | None = None
    started: str | None = None
    finished: str | None = None
    reason: str | None = None


class ScalingMetricStatus(StatusModel):
    name: str
    value: float | None = Field(default=None, description="None: no data.")
    target: float
    replicas: int | None = Field(default=None, description="What this metric alone asks for.")


class ScalingDecision(StatusModel):
    time: str
    from_replicas: int = Field(alias="from")
    to_replicas: int = Field(alias="to")
    reason: str
    message: str = ""
    metrics: list[ScalingMetricStatus] = Field(default_factory=list)


class AutoscalingStatus(StatusModel):
    engine: str
    desired_replicas: int | None = None
    capacity_replicas: int | None = Field(
        default=None, description="Replicas the reachable GPUs can hold, when known."
    )
    last_scale_time: str | None = None
    last_request_time: str | None = Field(
        default=None, description="Last time requests were seen (scale to zero)."
    )
    last_decision: ScalingDecision | None = None
    reason: str | None = Field(
        default=None, description="Why the engine cannot decide, when it cannot: NoMetricsSource."
    )
    message: str | None = None


class ActivationStatus(StatusModel):
    """What the activator reads (scale to zero): how callers reach the Service, and where
    its Ready pods are once it is awake."""

    service_ip: str | None = Field(
        default=None,
        alias="serviceIP",  # as Kubernetes spells clusterIP
        description="The Service's ClusterIP: callers that address it by IP.",
    )
    addresses: list[str] = Field(
        default_factory=list,
        description="Ready pods' addresses (their sidecar's ports 8080 and 8081), at most"
        f" {MAX_ACTIVATION_ADDRESSES}: where the activator forwards what it held.",
    )


class ModelDeploymentStatus(StatusModel):
    observed_generation: int | None = None
    phase: Phase | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    updated_replicas: int | None = None
    available_replicas: int | None = None
    warm_replicas: int | None = Field(
        default=None,
        description="Pods whose model came whole from the node-local cache (no download).",
    )
    ready: str | None = Field(default=None, description='Ready over desired, e.g. "2/3".')
    gpus: int | None = Field(default=None, description="GPUs requested by all replicas.")
    selector: str | None = None
    stable: TrackStatus | None = None
    canary: TrackStatus | None = None
    rollback: RollbackStatus | None = None
    analysis: list[AnalysisResult] = Field(default_factory=list)
    autoscaling: AutoscalingStatus | None = None
    activation: ActivationStatus | None = None
    conditions: list[Condition] = Field(default_factory=list)
    history: list[HistoryEntry] = Field(default_factory=list)


class ObjectMeta(BaseModel):
    """The parts of metadata the operator reads; everything else is kept as is."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    labels: dict[str, str] = Field(default_factory=dict)


class ModelDeployment(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    kind: str = KIND
    metadata: ObjectMeta
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus = Field(default_factory=ModelDeploymentStatus)
