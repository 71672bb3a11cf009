"""The pure builders, pinned by golden files (UPDATE_GOLDEN=1 rewrites them)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from modeldeploy_operator.api.v1alpha1 import ModelDeployment
from modeldeploy_operator.builders.autoscaler import (
    build_hpa,
    build_scaled_object,
    render_adapter_rules,
)
from modeldeploy_operator.builders.deployment import BuildConfig, build_deployment, surge_strategy
from modeldeploy_operator.builders.labels import revision_of
from modeldeploy_operator.builders.service import build_service
from modeldeploy_runtime.__main__ import parse_args
from modeldeploy_runtime.settings import RuntimeSettings
from support import DELETE, load_example, merged

GOLDEN = Path(__file__).parent / "golden"
CONFIG = BuildConfig(runtime_image="ghcr.io/modeldeploy/runtime:test")


def model(doc: dict[str, Any], namespace: str = "vision") -> ModelDeployment:
    doc = merged(doc, {"metadata": {"namespace": namespace, "uid": "0000-uid", "generation": 1}})
    return ModelDeployment.model_validate(doc)


def check_golden(name: str, built: dict[str, Any]) -> None:
    path = GOLDEN / name
    text = yaml.safe_dump(built, sort_keys=False, width=100)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path.name} missing: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} changed: review, then UPDATE_GOLDEN=1"


@pytest.mark.parametrize("example", ["minimal", "full"])
def test_children_match_golden_files(example: str) -> None:
    md = model(load_example(f"{example}.yaml"))
    revision = revision_of(md, CONFIG.runtime_image)
    check_golden(f"{example}-deployment.yaml", build_deployment(md, "stable", revision, CONFIG))
    check_golden(f"{example}-service.yaml", build_service(md))


def test_gpu_request_becomes_limit_selector_and_toleration() -> None:
    md = model(load_example("minimal.yaml"))
    pod = build_deployment(md, "stable", "r1", CONFIG)["spec"]["template"]["spec"]
    triton = pod["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_cpu_only_model_gets_no_gpu_traits() -> None:
    md = model(merged(load_example("minimal.yaml"), {"spec": {"resources": {"gpu": DELETE}}}))
    pod = build_deployment(md, "stable", "r1", CONFIG)["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod
    assert "limits" not in pod["containers"][0]["resources"]


def test_every_container_is_restricted() -> None:
    md = model(load_example("full.yaml"))
    pod = build_deployment(md, "stable", "r1", CONFIG)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for container in pod["initContainers"] + pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert context["readOnlyRootFilesystem"] is True


def test_with_pinned_images_every_container_runs_by_digest() -> None:
    """Reliability case 37: the runtime image pinned by the chart (runtime.digest) and the
    Triton image pinned in the spec (which the chart's admission policy requires in labelled
    namespaces): every container of a model pod then runs an image@sha256: reference."""
    digest = "sha256:" + "c" * 64
    pinned = {"spec": {"server": {"image": f"nvcr.io/nvidia/tritonserver:24.10-py3@{digest}"}}}
    md = model(merged(load_example("full.yaml"), pinned))
    config = replace(CONFIG, runtime_image=f"ghcr.io/modeldeploy/runtime@{digest}")
    pod = build_deployment(md, "stable", "r1", config)["spec"]["template"]["spec"]
    images = {c["name"]: c["image"] for c in pod["initContainers"] + pod["containers"]}
    assert set(images) == {"fetch-model", "triton", "runtime"}
    assert all(image.endswith(f"@{digest}") for image in images.values()), images


def test_credentials_are_mounted_only_into_the_fetcher() -> None:
    md = model(load_example("full.yaml"))
    pod = build_deployment(md, "stable", "r1", CONFIG)["spec"]["template"]["spec"]

    def mounts(container: dict[str, Any]) -> set[str]:
        return {m["name"] for m in container.get("volumeMounts", [])}

    assert "model-credentials" in mounts(pod["initContainers"][0])
    assert all("model-credentials" not in mounts(c) for c in pod["containers"])


def test_autoscaled_deployments_get_the_count_the_autoscaler_chose_within_bounds() -> None:
    doc = load_example("full.yaml")  # minReplicas 1, maxReplicas 4
    assert build_deployment(model(doc), "stable", "r1", CONFIG)["spec"]["replicas"] == 1
    chosen = model(merged(doc, {"spec": {"replicas": 3}}))
    assert build_deployment(chosen, "stable", "r1", CONFIG)["spec"]["replicas"] == 3
    beyond = model(merged(doc, {"spec": {"replicas": 9}}))
    assert build_deployment(beyond, "stable", "r1", CONFIG)["spec"]["replicas"] == 4
    fixed = build_deployment(model(load_example("minimal.yaml")), "stable", "r1", CONFIG)
    assert fixed["spec"]["replicas"] == 1


def test_hpa_and_scaled_object_match_golden_files() -> None:
    doc = load_example("full.yaml")
    check_golden(
        "full-hpa.yaml", build_hpa(model(merged(doc, {"spec": {"autoscaling": {"engine": "hpa"}}})))
    )
    keda = model(merged(doc, {"spec": {"autoscaling": {"engine": "keda"}}}))
    check_golden("full-scaledobject.yaml", build_scaled_object(keda, "http://prometheus:9090"))


def test_sidecar_is_gated_and_the_service_follows_it() -> None:
    off = model(
        merged(
            load_example("minimal.yaml"), {"spec": {"monitoring": {"runtime": {"enabled": False}}}}
        )
    )
    pod = build_deployment(off, "stable", "r1", CONFIG)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["triton"]
    assert {p["targetPort"] for p in build_service(off)["spec"]["ports"]} == {"http", "grpc"}
    on = model(load_example("minimal.yaml"))
    pod = build_deployment(on, "stable", "r1", CONFIG)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["triton", "runtime"]
    assert {p["targetPort"] for p in build_service(on)["spec"]["ports"]} == {
        "proxy-http",
        "proxy-grpc",
    }


@pytest.mark.parametrize(
    ("gpus", "max_surge_gpus", "expected"),
    [
        (1, None, {"maxSurge": 1, "maxUnavailable": 0}),
        (2, 4, {"maxSurge": 2, "maxUnavailable": 0}),
        (2, 1, {"maxSurge": 0, "maxUnavailable": 1}),  # not enough spare GPUs for one pod
        (4, 0, {"maxSurge": 0, "maxUnavailable": 1}),
    ],
)
def test_surge_is_bounded_by_spare_gpus(
    gpus: int, max_surge_gpus: int | None, expected: dict[str, int]
) -> None:
    patch: dict[str, Any] = {"spec": {"resources": {"gpu": {"count": gpus}}}}
    if max_surge_gpus is not None:
        patch["spec"]["rollout"] = {"maxSurgeGPUs": max_surge_gpus}
    assert (
        surge_strategy(model(merged(load_example("minimal.yaml"), patch)))["rollingUpdate"]
        == expected
    )


def test_revision_follows_the_pod_not_the_replica_count() -> None:
    base = model(load_example("minimal.yaml"))
    scaled = model(merged(load_example("minimal.yaml"), {"spec": {"replicas": 5}}))
    new_version = model(merged(load_example("minimal.yaml"), {"spec": {"model": {"version": "2"}}}))
    assert revision_of(base, "img") == revision_of(scaled, "img")
    assert revision_of(base, "img") != revision_of(new_version, "img")
    assert revision_of(base, "img") != revision_of(base, "img2")


def test_the_runtime_accepts_every_flag_the_operator_passes() -> None:
    """The pod's fetch-model and runtime commands parse with the runtime's own CLI."""
    doc = merged(
        load_example("full.yaml"),
        {
            "spec": {
                "monitoring": {
                    "runtime": {"referenceProfile": {"configMapRef": {"name": "profile"}}},
                    "auth": {"apiKeySecret": {"name": "keys"}, "rateLimitPerClient": "10/s"},
                }
            }
        },
    )
    pod = build_deployment(model(doc), "canary", "r1", CONFIG)["spec"]["template"]["spec"]
    fetch = parse_args(pod["initContainers"][0]["args"])
    assert fetch.command == "fetch"
    assert fetch.credentials_dir is not None
    serve = parse_args(pod["containers"][1]["args"])
    settings = RuntimeSettings(
        **{
            k: v
            for k, v in vars(serve).items()
            if k in RuntimeSettings.model_fields and v is not None
        }
    )
    assert settings.track == "canary"
    assert settings.model == "bert_large"
    assert settings.rate_limit_per_client == "10/s"
    assert settings.reference_profile is not None
    assert settings.api_keys_dir is not None
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][1]["ports"]}
    assert (settings.http_port, settings.grpc_port, settings.metrics_port) == (
        ports["proxy-http"],
        ports["proxy-grpc"],
        ports["proxy-metrics"],
    )


def test_the_charts_prometheus_adapter_rules_are_current() -> None:
    rules = Path(__file__).parents[2] / "charts/modeldeploy/files/prometheus-adapter-rules.yaml"
    assert rules.read_text() == render_adapter_rules(), "stale: run `make crds`"
    names = {r["name"]["as"] for r in yaml.safe_load(rules.read_text())["rules"]}
    hpa = build_hpa(
        model(merged(load_example("full.yaml"), {"spec": {"autoscaling": {"engine": "hpa"}}}))
    )
    used = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert used <= names, "the HPA asks for a metric no adapter rule provides"


def test_an_archive_gets_the_node_cache_plain_http_and_its_drift_profile() -> None:
    """oci:// models: the fetcher gets the node cache (a hostPath only it mounts) and the
    registry's scheme; the sidecar reads the archive's manifest for its drift profile."""
    doc = merged(
        load_example("iris.yaml"),
        {"spec": {"model": {"storageUri": "oci://registry.ns:5000/iris:1", "plainHTTP": True}}},
    )
    cached = BuildConfig(runtime_image="r:test", model_cache_dir="/var/lib/modeldeploy/cache")
    pod = build_deployment(model(doc), "stable", "r1", cached)["spec"]["template"]["spec"]
    fetch = parse_args(pod["initContainers"][0]["args"])
    assert fetch.plain_http
    assert fetch.cache_dir == Path("/var/cache/modeldeploy/models")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-cache"]["hostPath"]["path"] == "/var/lib/modeldeploy/cache"
    users = [
        c["name"]
        for c in [*pod["initContainers"], *pod["containers"]]
        if any(m["name"] == "model-cache" for m in c.get("volumeMounts", []))
    ]
    assert users == ["fetch-model"]
    serve = parse_args(pod["containers"][1]["args"])
    assert serve.archive_manifest == "/models/iris/modeldeploy.json"
    # Without a cache folder, or for other sources, no hostPath at all.
    for config, uri in ((CONFIG, "oci://r.io/iris:1"), (cached, "s3://b/iris/1")):
        other = merged(doc, {"spec": {"model": {"storageUri": uri, "plainHTTP": DELETE}}})
        spec = build_deployment(model(other), "stable", "r1", config)["spec"]["template"]["spec"]
        assert all("hostPath" not in v for v in spec["volumes"])


def test_a_pinned_archive_prefers_nodes_whose_cache_holds_it() -> None:
    """Only a digest the spec pins can be in the template (a tag's is known too late); the
    preference joins the user's affinity instead of replacing it."""
    digest = "sha256:" + "c" * 64
    user = {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10, "preference": {}}]}
    doc = merged(
        load_example("iris.yaml"),
        {
            "spec": {
                "model": {"storageUri": f"oci://r.io/iris@{digest}"},
                "placement": {"affinity": {"nodeAffinity": user}},
            }
        },
    )
    cached = BuildConfig(runtime_image="r:test", model_cache_dir="/var/lib/modeldeploy/cache")
    pod = build_deployment(model(doc), "stable", "r1", cached)["spec"]["template"]["spec"]
    preferred = pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0] == {"weight": 10, "preference": {}}
    assert preferred[1]["preference"]["matchExpressions"] == [
        {"key": "cache.modeldeploy.io/sha256." + "c" * 48, "operator": "Exists"}
    ]
    assert model(doc).spec.placement.affinity == {"nodeAffinity": user}  # not mutated
    tagged = merged(doc, {"spec": {"model": {"storageUri": "oci://r.io/iris:1"}}})
    pod = build_deployment(model(tagged), "stable", "r1", cached)["spec"]["template"]["spec"]
    assert pod["affinity"] == {"nodeAffinity": user}
