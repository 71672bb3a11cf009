"""The API server rejects what the schema and CEL rules can express, naming the field.

Each case starts from examples/minimal.yaml, changes one thing, and submits it with
``kubectl create --dry-run=server``: the real API server validates it, nothing is stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import Cluster
from localcluster.operator import OperatorProcess
from support import DELETE, get, load_example, merged, wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
AUTOSCALING = {
    "minReplicas": 1,
    "maxReplicas": 4,
    "metrics": [{"type": "InFlightPerReplica", "target": 4}],
}


def scaling(**fields: Any) -> dict[str, Any]:
    return {"spec": {"autoscaling": {**AUTOSCALING, **fields}}}


def rollout(**fields: Any) -> dict[str, Any]:
    return {"spec": {"rollout": fields}}


ONE_METRIC = {"metrics": [{"name": "errors", "builtin": "ErrorRatio", "max": 0.01}]}


def analysis_metric(**fields: Any) -> dict[str, Any]:
    return rollout(analysis={"metrics": [{"name": "m", **fields}]})


# (id, patch, the field the message must name, what the message must say)
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "custom-metric-without-query",
        scaling(metrics=[{"type": "Custom", "target": 1}]),
        "spec.autoscaling.metrics[0].query",
        "required for type Custom",
    ),
    (
        "query-on-a-builtin-metric",
        scaling(metrics=[{"type": "InFlightPerReplica", "target": 4, "query": "up"}]),
        "spec.autoscaling.metrics[0].query",
        "allowed only there",
    ),
    (
        "custom-metric-with-hpa",
        scaling(engine="hpa", metrics=[{"type": "Custom", "target": "0.5", "query": "up"}]),
        "spec.autoscaling.metrics",
        "needs engine builtin or keda",
    ),
    (
        "scale-to-zero-with-hpa",
        scaling(engine="hpa", scaleToZero={"enabled": True}),
        "spec.autoscaling.scaleToZero",
        "needs engine builtin or keda",
    ),
    (
        "target-not-a-number",
        scaling(metrics=[{"type": "RPSPerReplica", "target": "lots"}]),
        "spec.autoscaling.metrics[0].target",
        "must be a positive number",
    ),
    (
        "cpu-utilization-without-cpu",
        scaling(metrics=[{"type": "CPUUtilization", "target": 70}]),
        "spec.autoscaling.metrics",
        "needs spec.resources.cpu",
    ),
    (
        "idle-after-not-duration",
        scaling(scaleToZero={"enabled": True, "idleAfter": "a while"}),
        "spec.autoscaling.scaleToZero.idleAfter",
        "must be a duration",
    ),
    (
        "min-replicas-zero",
        scaling(minReplicas=0),
        "spec.autoscaling.minReplicas",
        "greater than or equal to 1",
    ),
    (
        "min-above-max",
        {"spec": {"autoscaling": {**AUTOSCALING, "minReplicas": 5}}},
        "spec.autoscaling.minReplicas",
        "less than or equal to maxReplicas",
    ),
    (
        "autoscaling-without-metrics",
        {"spec": {"autoscaling": {**AUTOSCALING, "metrics": []}}},
        "spec.autoscaling.metrics",
        "should have at least 1 items",
    ),
    (
        "latency-target-not-duration",
        {
            "spec": {
                "autoscaling": {**AUTOSCALING, "metrics": [{"type": "P99Latency", "target": 250}]}
            }
        },
        "spec.autoscaling.metrics[0].target",
        "must be a duration such as 250ms",
    ),
    (
        "gpu-utilization-above-100",
        {
            "spec": {
                "autoscaling": {
                    **AUTOSCALING,
                    "metrics": [{"type": "GPUUtilization", "target": 150}],
                }
            }
        },
        "spec.autoscaling.metrics[0].target",
        "1-100",
    ),
    (
        "weights-decrease",
        rollout(steps=[{"weight": 50}, {"weight": 10}]),
        "spec.rollout.steps",
        "weights must strictly increase",
    ),
    (
        "weights-repeat",
        rollout(steps=[{"weight": 10}, {"weight": 10}]),
        "spec.rollout.steps",
        "weights must strictly increase",
    ),
    (
        "weight-zero",
        rollout(steps=[{"weight": 0}]),
        "spec.rollout.steps[0].weight",
        "greater than or equal to 1",
    ),
    (
        "weight-above-100",
        rollout(steps=[{"weight": 150}]),
        "spec.rollout.steps[0].weight",
        "less than or equal to 100",
    ),
    (
        "pause-not-duration",
        rollout(steps=[{"weight": 10, "pause": "forever"}]),
        "spec.rollout.steps[0].pause",
        "must be 'manual' or a duration",
    ),
    (
        "step-weight-and-shadow",
        rollout(steps=[{"weight": 10, "shadow": {"percent": 10}}]),
        "spec.rollout.steps[0]",
        "exactly one of weight or shadow",
    ),
    (
        "step-neither-weight-nor-shadow",
        rollout(steps=[{"pause": "1m"}]),
        "spec.rollout.steps[0]",
        "exactly one of weight or shadow",
    ),
    (
        "shadow-after-weight",
        rollout(steps=[{"weight": 10}, {"shadow": {"percent": 10}}]),
        "spec.rollout.steps",
        "shadow steps come before any weighted step",
    ),
    (
        "shadow-percent-zero",
        rollout(steps=[{"shadow": {"percent": 0}}]),
        "spec.rollout.steps[0].shadow.percent",
        "greater than or equal to 1",
    ),
    (
        "shadow-without-sidecar",
        {
            "spec": {
                "rollout": {"strategy": "Canary", "steps": [{"shadow": {"percent": 10}}]},
                "monitoring": {"runtime": {"enabled": False}},
            }
        },
        "spec.rollout.steps",
        "needs spec.monitoring.runtime.enabled",
    ),
    (
        "steps-with-rolling",
        rollout(strategy="Rolling", steps=[{"weight": 10}]),
        "spec.rollout.steps",
        "apply only to strategy Canary",
    ),
    (
        "interval-not-duration",
        rollout(analysis={"interval": "30 seconds"}),
        "spec.rollout.analysis.interval",
        "must be a duration",
    ),
    (
        "metric-builtin-and-query",
        analysis_metric(builtin="ErrorRatio", query="up", max=1),
        "spec.rollout.analysis.metrics[0]",
        "exactly one of builtin or query",
    ),
    (
        "metric-without-bounds",
        analysis_metric(builtin="ErrorRatio"),
        "spec.rollout.analysis.metrics[0]",
        "must set min, max or both",
    ),
    (
        "metric-min-above-max",
        analysis_metric(builtin="ErrorRatio", min=2, max=1),
        "spec.rollout.analysis.metrics[0].min",
        "less than or equal to max",
    ),
    (
        "two-traffic-routers",
        rollout(trafficRouting={"replicas": {}, "gatewayAPI": {"parentRefs": [{"name": "gw"}]}}),
        "spec.rollout.trafficRouting",
        "exactly one of replicas or gatewayAPI",
    ),
    (
        "storage-scheme",
        {"spec": {"model": {"storageUri": "ftp://models/resnet50"}}},
        "spec.model.storageUri",
        "must start with one of s3://, gs://, pvc://, https://, hf://, oci://",
    ),
    (
        "format",
        {"spec": {"model": {"format": "pickle"}}},
        "spec.model.format",
        'supported values: "onnx"',
    ),
    (
        "version-not-integer",
        {"spec": {"model": {"version": "v3"}}},
        "spec.model.version",
        "must be a positive integer",
    ),
    (
        "model-name",
        {"spec": {"model": {"name": "my model"}}},
        "spec.model.name",
        "must be letters, digits",
    ),
    (
        "storage-uri-missing",
        {"spec": {"model": {"storageUri": DELETE}}},
        "spec.model.storageUri",
        "Required value",
    ),
    (
        "gpu-count-zero",
        {"spec": {"resources": {"gpu": {"count": 0}}}},
        "spec.resources.gpu.count",
        "greater than or equal to 1",
    ),
    (
        "cpu-not-quantity",
        {"spec": {"resources": {"cpu": "four"}}},
        "spec.resources.cpu",
        "must be a positive Kubernetes quantity",
    ),
    (
        "memory-negative",
        {"spec": {"resources": {"memory": "-1Gi"}}},
        "spec.resources.memory",
        "must be a positive Kubernetes quantity",
    ),
    (
        "replicas-negative",
        {"spec": {"replicas": -1}},
        "spec.replicas",
        "greater than or equal to 0",
    ),
    (
        "operator-owned-arg",
        {"spec": {"server": {"args": ["--model-repository=/elsewhere"]}}},
        "spec.server.args",
        "must not set --model-repository",
    ),
    (
        "batching-without-max-batch",
        {"spec": {"model": {"config": {"dynamicBatching": {"preferredBatchSizes": [4]}}}}},
        "spec.model.config",
        "needs spec.model.config.maxBatchSize > 0",
    ),
    (
        "preferred-batch-above-max",
        {
            "spec": {
                "model": {
                    "config": {"maxBatchSize": 8, "dynamicBatching": {"preferredBatchSizes": [16]}}
                }
            }
        },
        "spec.model.config",
        "preferredBatchSizes must not exceed maxBatchSize",
    ),
    (
        "credentials-secret-name",
        {"spec": {"model": {"credentialsSecret": "Bad_Name"}}},
        "spec.model.credentialsSecret",
        "must be a Kubernetes object name",
    ),
    (
        "sample-rate",
        {"spec": {"monitoring": {"runtime": {"sampleRate": 1.5}}}},
        "spec.monitoring.runtime.sampleRate",
        "less than or equal to 1",
    ),
    (
        "rate-limit",
        {"spec": {"monitoring": {"auth": {"rateLimitPerClient": "fast"}}}},
        "spec.monitoring.auth.rateLimitPerClient",
        "must look like 100/s",
    ),
    # Durations that set how often a loop runs have a floor.
    (
        "analysis-without-metrics",
        rollout(analysis={"interval": "30s"}),
        "spec.rollout.analysis.metrics",
        "must name at least one metric",
    ),
    (
        "analysis-interval-zero",
        rollout(analysis={"interval": "0s", **ONE_METRIC}),
        "spec.rollout.analysis.interval",
        "must be at least 1s",
    ),
    (
        "analysis-interval-below-a-second",
        rollout(analysis={"interval": "500ms", **ONE_METRIC}),
        "spec.rollout.analysis.interval",
        "must be at least 1s",
    ),
    (
        "autoscaling-interval-zero",
        scaling(interval="0s"),
        "spec.autoscaling.interval",
        "must be at least 1s",
    ),
    (
        "idle-after-zero",
        scaling(scaleToZero={"enabled": True, "idleAfter": "0s"}),
        "spec.autoscaling.scaleToZero.idleAfter",
        "must be at least 1s",
    ),
    (
        "wake-timeout-not-duration",
        scaling(scaleToZero={"enabled": True, "wakeTimeout": "forever"}),
        "spec.autoscaling.scaleToZero.wakeTimeout",
        "must be a duration",
    ),
    (
        "wake-timeout-zero",
        scaling(scaleToZero={"enabled": True, "wakeTimeout": "0s"}),
        "spec.autoscaling.scaleToZero.wakeTimeout",
        "must be at least 1s",
    ),
    (
        "max-held-requests-zero",
        scaling(scaleToZero={"enabled": True, "maxHeldRequests": 0}),
        "spec.autoscaling.scaleToZero.maxHeldRequests",
        "greater than or equal to 1",
    ),
    # Fields that would be accepted and then ignored (bug 8).
    (
        "analysis-with-rolling",
        rollout(strategy="Rolling", analysis={"interval": "30s", **ONE_METRIC}),
        "spec.rollout.analysis",
        "applies only to strategy Canary",
    ),
    (
        "interval-with-hpa",
        scaling(engine="hpa", interval="30s"),
        "spec.autoscaling.interval",
        "applies to engines builtin and keda",
    ),
    (
        "tolerance-with-hpa",
        scaling(engine="hpa", behavior={"tolerancePercent": 5}),
        "spec.autoscaling.behavior.tolerancePercent",
        "applies only to engine builtin",
    ),
    (
        "tolerance-with-keda",
        scaling(
            engine="keda",
            behavior={"tolerancePercent": 5},
            prometheus={"url": "http://prometheus.monitoring:9090"},
        ),
        "spec.autoscaling.behavior.tolerancePercent",
        "applies only to engine builtin",
    ),
    (
        "auth-without-runtime",
        {
            "spec": {
                "monitoring": {"runtime": {"enabled": False}, "auth": {"rateLimitPerClient": "1/s"}}
            }
        },
        "spec.monitoring.auth",
        "needs spec.monitoring.runtime.enabled",
    ),
    (
        "reference-profile-without-runtime",
        {
            "spec": {
                "monitoring": {
                    "runtime": {
                        "enabled": False,
                        "referenceProfile": {"configMapRef": {"name": "profile"}},
                    }
                }
            }
        },
        "spec.monitoring.runtime.referenceProfile",
        "needs spec.monitoring.runtime.enabled",
    ),
    (
        "admin-apis-without-runtime",
        {"spec": {"monitoring": {"runtime": {"enabled": False, "allowAdminApis": True}}}},
        "spec.monitoring.runtime.allowAdminApis",
        "needs spec.monitoring.runtime.enabled",
    ),
    (
        "budget-without-keys",
        {"spec": {"monitoring": {"auth": {"queryBudget": {"queries": 100}}}}},
        "spec.monitoring.auth.queryBudget",
        "needs spec.monitoring.auth.apiKeySecret",
    ),
    (
        "budget-window-nonsense",
        {
            "spec": {
                "monitoring": {
                    "auth": {
                        "apiKeySecret": {"name": "keys"},
                        "queryBudget": {"queries": 100, "window": "1 day"},
                    }
                }
            }
        },
        "spec.monitoring.auth.queryBudget.window",
        "should match",
    ),
    (
        "coarsening-that-does-nothing",
        {"spec": {"monitoring": {"auth": {"outputs": [{"name": "probs"}]}}}},
        "spec.monitoring.auth.outputs[0]",
        "needs decimals, topK or both",
    ),
    (
        "triton-address-flag",
        {"spec": {"server": {"args": ["--http-address=0.0.0.0"]}}},
        "spec.server.args",
        "the operator owns them",
    ),
    ("name-too-long", {"metadata": {"name": "m" * 46}}, "metadata.name", "at most 45 characters"),
    # The Service takes the ModelDeployment's name: a DNS-1035 label, no dots.
    ("name-with-dots", {"metadata": {"name": "resnet.v2"}}, "metadata.name", "(no dots)"),
    ("name-starting-with-a-digit", {"metadata": {"name": "50resnet"}}, "metadata.name", "letter"),
    (
        "env-value-too-long",
        {"spec": {"server": {"env": [{"name": "A", "value": "x" * 8193}]}}},
        "spec.server.env[0].value",
        "may not be more than 8192",
    ),
    (
        "too-many-env",
        {"spec": {"server": {"env": [{"name": f"E{i}", "value": "1"} for i in range(129)]}}},
        "spec.server.env",
        "must have at most 128 items",
    ),
    ("unknown-field", {"spec": {"replica": 2}}, "spec.replica", "unknown field"),
]


@pytest.fixture(scope="module")
def minimal() -> dict[str, Any]:
    return load_example("minimal.yaml")


def submit(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> tuple[int, str]:
    result = cluster.kubectl(
        "create",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        stdin=yaml.safe_dump(manifest),
        check=False,
    )
    return result.returncode, result.stderr


def test_the_examples_are_valid(cluster: Cluster, crd: None, namespace: str) -> None:
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        code, stderr = submit(cluster, namespace, yaml.safe_load(example.read_text()))
        assert code == 0, f"{example.name}: {stderr}"


@pytest.mark.parametrize(
    ("patch", "field", "text"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_spec_is_rejected_naming_the_field(
    cluster: Cluster,
    crd: None,
    namespace: str,
    minimal: dict[str, Any],
    patch: dict[str, Any],
    field: str,
    text: str,
) -> None:
    code, stderr = submit(cluster, namespace, merged(minimal, patch))
    assert code != 0, "the API server accepted it"
    assert field in stderr, stderr
    assert text in stderr, stderr


VALID = [
    ("analysis-every-second", rollout(analysis={"interval": "1s", **ONE_METRIC})),
    (
        "shadow-steps-then-weights",
        rollout(
            steps=[
                {"shadow": {"percent": 5}, "pause": "1m"},
                {"shadow": {"percent": 50}},
                {"weight": 20},
                {"weight": 100},
            ]
        ),
    ),
    ("shadow-steps-only", rollout(steps=[{"shadow": {"percent": 100}, "pause": "manual"}])),
    ("rolling-without-analysis", rollout(strategy="Rolling")),
    ("runtime-off-without-auth", {"spec": {"monitoring": {"runtime": {"enabled": False}}}}),
    ("replicas-under-autoscaling", {"spec": {"replicas": 3, **scaling()["spec"]}}),
    (
        "every-metric",
        scaling(
            metrics=[
                {"type": "InFlightPerReplica", "target": 4},
                {"type": "RPSPerReplica", "target": "12.5"},
                {"type": "P99Latency", "target": "250ms"},
                {"type": "QueueTime", "target": "20ms"},
                {"type": "GPUUtilization", "target": 80},
                {"type": "Custom", "name": "queue", "target": "0.5", "query": "vector(1)"},
                {"type": "Custom", "name": "other", "target": 2, "query": "vector(2)"},
            ]
        ),
    ),
    (
        "behaviour-and-scale-to-zero",
        scaling(
            engine="keda",
            interval="5s",
            behavior={
                "scaleUpStabilization": "0s",
                "scaleDownStabilization": "2m",
                "maxScaleUpStep": 4,
                "maxScaleDownStep": 1,
            },
            scaleToZero={
                "enabled": True,
                "idleAfter": "15m",
                "wakeTimeout": "20m",
                "maxHeldRequests": 500,
            },
            prometheus={"url": "http://prometheus.monitoring:9090"},
        ),
    ),
    ("builtin-tolerance-and-one-second", scaling(interval="1s", behavior={"tolerancePercent": 5})),
    ("hpa-with-steps", scaling(engine="hpa", behavior={"maxScaleUpStep": 2})),
    (
        "cpu-utilization-with-cpu",
        merged(
            scaling(metrics=[{"type": "CPUUtilization", "target": 70}]),
            {"spec": {"resources": {"cpu": "4"}}},
        ),
    ),
]


@pytest.mark.parametrize("patch", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_variants_are_accepted(
    cluster: Cluster, crd: None, namespace: str, minimal: dict[str, Any], patch: dict[str, Any]
) -> None:
    code, stderr = submit(cluster, namespace, merged(minimal, patch))
    assert code == 0, stderr


def test_a_spec_at_every_bound_is_stored_and_reconciled(
    cluster: Cluster, operator: OperatorProcess, namespace: str, minimal: dict[str, Any]
) -> None:
    """A ModelDeployment as large as the schema lets it be (a name of 45 characters, 128
    environment variables of 8 KiB: a 1 MiB spec, beside free-form affinity and spread
    constraints) is stored, and its Deployment carries all of it: what the API server
    accepts, the children can carry (etcd's limit is 1.5 MiB per object)."""
    name = "m" + "x" * 44
    env = [{"name": f"E{i:03d}", "value": chr(97 + i % 26) * 8192} for i in range(128)]
    spread = [
        {
            "maxSkew": 1,
            "topologyKey": f"topology.example.com/zone-{i}",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"serving.modeldeploy.io/modeldeployment": name}},
        }
        for i in range(8)
    ]
    affinity = {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 1 + i,
                    "preference": {
                        "matchExpressions": [
                            {"key": f"example.com/k{i}", "operator": "In", "values": ["a", "b"]}
                        ]
                    },
                }
                for i in range(50)
            ]
        }
    }
    manifest = merged(
        minimal,
        {
            "metadata": {"name": name},
            "spec": {
                "server": {"env": env},
                "placement": {"affinity": affinity, "topologySpreadConstraints": spread},
            },
        },
    )
    body = json.dumps(manifest)
    assert len(body) > 2**20  # the spec is a mebibyte
    # `create`, not `apply`: apply's last-applied annotation may not exceed 256 KiB.
    cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=body, timeout=60)

    def deployment() -> dict[str, Any] | None:
        return get(cluster, namespace, "deployment", f"{name}-stable")

    found = wait_for("the Deployment", deployment, timeout=60)
    pod = found["spec"]["template"]["spec"]
    triton = next(c for c in pod["containers"] if c["name"] == "triton")
    carried = {e["name"]: e.get("value") for e in triton["env"]}
    assert all(carried.get(e["name"]) == e["value"] for e in env)
    assert len(pod["topologySpreadConstraints"]) == 8
    preferred = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert len(preferred) >= 50
    assert get(cluster, namespace, "service", name) is not None
    wait_for(
        "Available",
        lambda: (
            (get(cluster, namespace, "md", name) or {}).get("status", {}).get("phase")
            == "Available"
        ),
        timeout=120,
    )
