"""The operator, as a real process, against the real control plane: children, placement,
status, self-healing, scaling and garbage collection."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import Cluster
from localcluster.nodes import A100_80GB, NodeSpec, node_manifest
from localcluster.operator import OperatorProcess, metric_sum
from support import DELETE, condition, every_kind_of_child, get, load_example, merged, wait_for

pytestmark = pytest.mark.cluster

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def apply(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))


def wait_condition(
    cluster: Cluster,
    namespace: str,
    name: str,
    type_: str,
    status: str,
    reason: str | None = None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        md = get(cluster, namespace, "md", name)
        cond = condition(md, type_)
        if cond and cond["status"] == status and (reason is None or cond["reason"] == reason):
            return md
        return None

    return wait_for(f"{name}: {type_}={status} {reason or ''}", check, timeout)


def pods_of(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.kubectl_json(
        "get", "pods", "-n", namespace, "-l", f"serving.modeldeploy.io/modeldeployment={name}"
    )["items"]
    return items


def our_events(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    items = cluster.kubectl_json("get", "events", "-n", namespace)["items"]
    return [e for e in items if e.get("source", {}).get("component") == "modeldeploy-operator"]


@pytest.mark.parametrize("example", ["minimal.yaml", "full.yaml"])
def test_example_becomes_ready_on_gpu_nodes_of_the_requested_product(
    cluster: Cluster, operator: OperatorProcess, namespace: str, example: str
) -> None:
    manifest = load_example(example)
    name = manifest["metadata"]["name"]
    gpu = manifest["spec"]["resources"]["gpu"]
    if example == "full.yaml":  # the Secret it names, so nothing is missing
        cluster.kubectl(
            "create",
            "secret",
            "generic",
            "s3-creds",
            "-n",
            namespace,
            "--from-literal=AWS_ACCESS_KEY_ID=x",
        )
    apply(cluster, namespace, manifest)
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Ready", f"md/{name}", "--timeout=60s", timeout=90
    )
    md = wait_condition(cluster, namespace, name, "Degraded", "False")
    assert md["status"]["phase"] == "Available"
    assert md["status"]["observedGeneration"] == md["metadata"]["generation"]

    nodes = {n["metadata"]["name"]: n for n in cluster.kubectl_json("get", "nodes")["items"]}
    pods = pods_of(cluster, namespace, name)
    assert pods
    for pod in pods:
        node = nodes[pod["spec"]["nodeName"]]
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == gpu["product"]
        [triton] = [c for c in pod["spec"]["containers"] if c["name"] == "triton"]
        assert triton["resources"]["limits"]["nvidia.com/gpu"] == str(gpu["count"])
        assert "--model-control-mode=none" in triton["args"]
        assert GPU_TOLERATION in pod["spec"]["tolerations"]
        assert pod["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == gpu["product"]
        assert [c["name"] for c in pod["spec"]["initContainers"]] == ["fetch-model"]
    service = get(cluster, namespace, "service", name)
    assert service is not None
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001}


def test_pods_pass_the_restricted_pod_security_standard(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    apply(cluster, namespace, load_example("minimal.yaml"))
    md = wait_condition(cluster, namespace, "resnet50", "Ready", "True")
    assert md["status"]["phase"] == "Available"
    assert len(pods_of(cluster, namespace, "resnet50")) == 1


def test_too_many_gpus_is_degraded_within_seconds_and_recovers_with_capacity(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    manifest = merged(load_example("minimal.yaml"), {"spec": {"resources": {"gpu": {"count": 8}}}})
    started = time.monotonic()
    apply(cluster, namespace, manifest)
    md = wait_condition(
        cluster, namespace, "resnet50", "Degraded", "True", "InsufficientGPU", timeout=15
    )
    elapsed = time.monotonic() - started
    assert elapsed < 15
    assert md["status"]["phase"] == "Degraded"
    ready = condition(md, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "InsufficientGPU")
    assert "Insufficient nvidia.com/gpu" in ready["message"]
    warnings = [e for e in our_events(cluster, namespace) if e["reason"] == "InsufficientGPU"]
    assert len(warnings) == 1
    assert warnings[0]["type"] == "Warning"

    big = NodeSpec("gpu-a100-big", cpu="128", memory="1024Gi", gpu=A100_80GB, gpu_count=8)
    cluster.kubectl("create", "-f", "-", stdin=yaml.safe_dump(node_manifest(big)))
    try:
        md = wait_condition(cluster, namespace, "resnet50", "Ready", "True", timeout=60)
        assert md["status"]["phase"] == "Available"
        assert pods_of(cluster, namespace, "resnet50")[0]["spec"]["nodeName"] == "gpu-a100-big"
        assert (condition(md, "Degraded") or {}).get("status") == "False"
    finally:
        cluster.kubectl("delete", "md", "resnet50", "-n", namespace, "--wait=true")
        cluster.kubectl("delete", "node", big.name, "--wait=false")


def test_gpu_product_no_node_has_is_reported(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    manifest = merged(
        load_example("minimal.yaml"), {"spec": {"resources": {"gpu": {"product": "NVIDIA-B200"}}}}
    )
    apply(cluster, namespace, manifest)
    md = wait_condition(cluster, namespace, "resnet50", "Degraded", "True", "GPUProductNotFound")
    message = condition(md, "Degraded")["message"]  # type: ignore[index]
    assert "NVIDIA-B200" in message
    assert "NVIDIA-A100-SXM4-80GB" in message  # says what there is


def test_missing_secret_is_reported_and_clears_when_created(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    manifest = merged(
        load_example("minimal.yaml"), {"spec": {"model": {"credentialsSecret": "creds"}}}
    )
    apply(cluster, namespace, manifest)
    md = wait_condition(cluster, namespace, "resnet50", "Degraded", "True", "SecretNotFound")
    assert "spec.model.credentialsSecret" in condition(md, "Degraded")["message"]  # type: ignore[index]
    cluster.kubectl("create", "secret", "generic", "creds", "-n", namespace, "--from-literal=k=v")
    wait_condition(cluster, namespace, "resnet50", "Degraded", "False", "AsExpected", timeout=20)
    recovered = [e for e in our_events(cluster, namespace) if e["reason"] == "Recovered"]
    assert len(recovered) == 1


def test_children_deleted_or_edited_by_hand_are_restored_within_10s(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, load_example("minimal.yaml"))
    wait_condition(cluster, namespace, "resnet50", "Ready", "True")
    original = get(cluster, namespace, "deployment", "resnet50-stable")
    assert original is not None

    cluster.kubectl("delete", "deployment", "resnet50-stable", "-n", namespace)
    restored = wait_for(
        "the Deployment to come back",
        lambda: (
            (d := get(cluster, namespace, "deployment", "resnet50-stable"))
            and d["metadata"]["uid"] != original["metadata"]["uid"]
            and d
        ),
        timeout=10,
    )
    assert restored["spec"]["template"]["spec"]["containers"][0]["name"] == "triton"

    cluster.kubectl("scale", "deployment", "resnet50-stable", "-n", namespace, "--replicas=3")
    cluster.kubectl("set", "image", "deployment/resnet50-stable", "-n", namespace, "triton=evil:1")
    wait_for(
        "the edits to be reverted",
        lambda: (
            (d := get(cluster, namespace, "deployment", "resnet50-stable"))
            and d["spec"]["replicas"] == 1
            and d["spec"]["template"]["spec"]["containers"][0]["image"].startswith("nvcr.io/")
        ),
        timeout=10,
    )

    service = get(cluster, namespace, "service", "resnet50")
    assert service is not None
    cluster.kubectl("delete", "service", "resnet50", "-n", namespace)
    wait_for(
        "the Service to come back",
        lambda: (
            (s := get(cluster, namespace, "service", "resnet50"))
            and s["metadata"]["uid"] != service["metadata"]["uid"]
        ),
        timeout=10,
    )


def test_every_kind_of_child_deleted_by_hand_comes_back_within_10s_with_an_event(
    cluster: Cluster,
    own_operator: list[OperatorProcess],
    namespace: str,
    tmp_path: Path,
    gateway_api: None,
    keda_crds: None,
) -> None:
    """Reliability case 22. This operator resyncs only every 5 minutes: what brings each
    child back within 10 s is its watch (Deployments, Services, HPAs, and ScaledObjects and
    HTTPRoutes, whose CRDs are installed). Each comes back as a new object, and a Warning
    Event says which was deleted."""
    process = OperatorProcess(
        cluster,
        tmp_path / "operator.log",
        resync_seconds=300,
        extra_args=(f"--namespace={namespace}", f"--leader-election-namespace={namespace}"),
    )
    own_operator.append(process)
    process.start()
    specs = every_kind_of_child()
    for manifest in specs.values():
        apply(cluster, namespace, manifest)
    for name in specs:
        wait_condition(cluster, namespace, name, "Ready", "True")
    children = [
        ("deployment", "hpa-stable"),
        ("service", "hpa"),
        ("horizontalpodautoscaler", "hpa"),
        ("scaledobject", "keda"),
        ("httproute", "routed"),
    ]

    def replaced(kind: str, name: str, uid: str) -> bool:
        found = get(cluster, namespace, kind, name)
        return found is not None and found["metadata"]["uid"] != uid

    took = {}
    for kind, name in children:
        before = get(cluster, namespace, kind, name)
        assert before is not None, (kind, name)
        started = time.monotonic()
        cluster.kubectl("delete", kind, name, "-n", namespace)
        uid = before["metadata"]["uid"]
        wait_for(f"{kind} {name} back", functools.partial(replaced, kind, name, uid), timeout=10)
        took[f"{kind}/{name}"] = round(time.monotonic() - started, 1)
    print(f"back after (s): {took}")

    def recreated() -> list[str]:
        return sorted(
            e["message"] for e in our_events(cluster, namespace) if e["reason"] == "Recreated"
        )

    expected = sorted(
        f"{kind} {name} was deleted; created it again"
        for kind, name in (
            ("Deployment", "hpa-stable"),
            ("Service", "hpa"),
            ("HorizontalPodAutoscaler", "hpa"),
            ("ScaledObject", "keda"),
            ("HTTPRoute", "routed"),
        )
    )
    wait_for("a Recreated Event for each", lambda: recreated() == expected, timeout=10)
    assert all(
        e["type"] == "Warning" for e in our_events(cluster, namespace) if e["reason"] == "Recreated"
    )


EDITS = [  # (JSON patch operation on the stable Deployment, what it is)
    ("replace", "/containers/0/args/0", "--model-repository=/elsewhere"),  # a value we set
    ("replace", "/containers/0/env/0/value", "edited"),
    ("add", "/containers/0/env/-", {"name": "INJECTED", "value": "yes"}),  # an addition
    ("replace", "/containers/1/ports/0/containerPort", 18080),
    ("add", "/containers/1/ports/-", {"name": "debug", "containerPort": 7777}),
    ("replace", "/containers/0/securityContext/allowPrivilegeEscalation", True),
    ("add", "/containers/0/securityContext/privileged", True),
    ("add", "/containers/0/securityContext/capabilities/add", ["NET_ADMIN"]),
    ("add", "/securityContext/sysctls", [{"name": "net.core.somaxconn", "value": "1024"}]),
]


def test_hand_edits_of_what_the_operator_sets_are_taken_back_within_10s(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """Reliability case 23: args, env, ports and securityContext edited by hand (values
    changed, and entries or fields added, which server-side apply alone would leave with
    their editor) are taken back within 10 s, and then nothing is written again."""
    env = [{"name": "TRITON_LOG", "value": "1"}]
    apply(
        cluster, namespace, merged(load_example("minimal.yaml"), {"spec": {"server": {"env": env}}})
    )
    wait_condition(cluster, namespace, "resnet50", "Ready", "True")
    original = get(cluster, namespace, "deployment", "resnet50-stable")
    assert original is not None
    template = original["spec"]["template"]["spec"]
    assert [c["name"] for c in template["containers"]] == ["triton", "runtime"]
    patch = [
        {"op": op, "path": f"/spec/template/spec{path}", "value": value}
        for op, path, value in EDITS
    ]
    cluster.kubectl("patch", "deployment", "resnet50-stable", "-n", namespace, "--type=json",
                    "-p", json.dumps(patch))  # fmt: skip
    edited = get(cluster, namespace, "deployment", "resnet50-stable") or {}
    assert edited["spec"]["template"]["spec"] != template  # the edits landed

    def taken_back() -> dict[str, Any] | None:
        found = get(cluster, namespace, "deployment", "resnet50-stable") or {}
        return found if found["spec"]["template"]["spec"] == template else None

    restored = wait_for("every edit taken back", taken_back, timeout=10)
    # Settled: the operator's passes (a resync every 3 s) write nothing more.
    time.sleep(3 * operator.resync_seconds)
    now = get(cluster, namespace, "deployment", "resnet50-stable") or {}
    assert now["metadata"]["resourceVersion"] == restored["metadata"]["resourceVersion"]


def test_kubectl_scale_md_scales_the_deployment(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, load_example("minimal.yaml"))
    wait_condition(cluster, namespace, "resnet50", "Ready", "True")
    cluster.kubectl("scale", "md", "resnet50", "-n", namespace, "--replicas=3")
    wait_for(
        "3 ready replicas",
        lambda: (
            (md := get(cluster, namespace, "md", "resnet50"))
            and md["status"].get("ready") == "3/3"
            and md["status"]["observedGeneration"] == md["metadata"]["generation"]
        ),
        timeout=30,
    )
    deployment = get(cluster, namespace, "deployment", "resnet50-stable")
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 3
    md = get(cluster, namespace, "md", "resnet50")
    assert md is not None
    assert md["status"]["replicas"] == 3
    assert md["status"]["gpus"] == 3
    assert md["status"]["selector"] == "serving.modeldeploy.io/modeldeployment=resnet50"
    assert all(
        c["observedGeneration"] == md["metadata"]["generation"] for c in md["status"]["conditions"]
    )


def test_deleting_the_modeldeployment_garbage_collects_every_child(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, load_example("minimal.yaml"))
    wait_condition(cluster, namespace, "resnet50", "Ready", "True")
    cluster.kubectl("delete", "md", "resnet50", "-n", namespace, "--wait=true", timeout=60)
    selector = "serving.modeldeploy.io/modeldeployment=resnet50"
    wait_for(
        "children to be garbage-collected",
        lambda: (
            cluster.kubectl(
                "get",
                "deployments,replicasets,services,pods",
                "-n",
                namespace,
                "-l",
                selector,
                "-o",
                "name",
            ).stdout.strip()
            == ""
        ),
        timeout=60,
    )


def test_printer_columns(cluster: Cluster, operator: OperatorProcess, namespace: str) -> None:
    apply(cluster, namespace, load_example("minimal.yaml"))
    wait_condition(cluster, namespace, "resnet50", "Ready", "True")
    wait_for(
        "the phase to be Available",
        lambda: (
            (get(cluster, namespace, "md", "resnet50") or {}).get("status", {}).get("phase")
            == "Available"
        ),
    )
    default = cluster.kubectl("get", "md", "-n", namespace).stdout.splitlines()
    assert default[0].split() == ["NAME", "MODEL", "VERSION", "READY", "PHASE", "GPUS", "AGE"]
    assert default[1].split()[:6] == ["resnet50", "resnet50", "1", "1/1", "Available", "1"]
    wide = cluster.kubectl("get", "md", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-3:] == ["STABLE", "CANARY", "WEIGHT"]


def test_operator_exports_its_own_metrics(operator: OperatorProcess) -> None:
    metrics = operator.metrics()
    assert metric_sum(metrics, "modeldeploy_reconcile_duration_seconds_count") > 0
    assert 'modeldeploy_modeldeployments{phase="Available"}' in metrics
    assert metric_sum(metrics, "modeldeploy_api_requests_total", verb="APPLY") > 0


def test_under_autoscaling_the_scale_subresource_sets_the_count_within_bounds(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    scaling = {
        "minReplicas": 1,
        "maxReplicas": 4,
        "metrics": [{"type": "InFlightPerReplica", "target": 4}],
    }
    apply(
        cluster,
        namespace,
        merged(
            load_example("minimal.yaml"),
            {"spec": {"autoscaling": scaling, "resources": {"gpu": DELETE}}},
        ),
    )
    wait_condition(cluster, namespace, "resnet50", "Ready", "True")

    def replicas() -> int:
        deployment = get(cluster, namespace, "deployment", "resnet50-stable")
        return int((deployment or {}).get("spec", {}).get("replicas", -1))

    # An autoscaler (or a human) scales the ModelDeployment: without metric data the
    # builtin engine keeps the count, resync after resync.
    cluster.kubectl("scale", "md", "resnet50", "-n", namespace, "--replicas=3")
    wait_for("3 replicas", lambda: replicas() == 3, timeout=10)
    time.sleep(2 * operator.resync_seconds + 1)
    assert replicas() == 3
    wait_for(
        "3/3 in status",
        lambda: (
            (get(cluster, namespace, "md", "resnet50") or {}).get("status", {}).get("ready")
            == "3/3"
        ),
        timeout=20,
    )
    status = (get(cluster, namespace, "md", "resnet50") or {})["status"]
    assert status["autoscaling"]["engine"] == "builtin"
    # Editing the Deployment does not count: the ModelDeployment's count is taken back.
    cluster.kubectl("scale", "deployment", "resnet50-stable", "-n", namespace, "--replicas=2")
    wait_for(
        "the Deployment back at 3", lambda: replicas() == 3, timeout=2 * operator.resync_seconds + 5
    )
    # Beyond maxReplicas it is brought back within bounds.
    cluster.kubectl("scale", "md", "resnet50", "-n", namespace, "--replicas=9")
    wait_for("replicas clamped to maxReplicas", lambda: replicas() == 4, timeout=10)
