"""The operator, as a real process, against the real control plane: children, placement,
status, self-healing, scaling and garbage collection."""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import Cluster
from localcluster.nodes import A100_80GB, NodeSpec, node_manifest
from localcluster.operator import OperatorProcess, metric_sum
from support import (
    DELETE,
    condition,
    cpu_model,
    every_kind_of_child,
    get,
    load_example,
    merged,
    start_scoped_operator,
    wait_for,
)

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


def replaced(cluster: Cluster, namespace: str, kind: str, name: str, uid: str) -> bool:
    """Whether the object exists again as a new one (another uid)."""
    found = get(cluster, namespace, kind, name)
    return found is not None and found["metadata"]["uid"] != uid


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
    start_scoped_operator(
        own_operator, cluster, namespace, tmp_path / "operator.log", resync_seconds=300
    )
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

    took = {}
    for kind, name in children:
        before = get(cluster, namespace, kind, name)
        assert before is not None, (kind, name)
        started = time.monotonic()
        cluster.kubectl("delete", kind, name, "-n", namespace)
        uid = before["metadata"]["uid"]
        wait_for(
            f"{kind} {name} back",
            functools.partial(replaced, cluster, namespace, kind, name, uid),
            timeout=10,
        )
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
    # The patch's answer: a get after it may already see the operator's take-back.
    edited = json.loads(
        cluster.kubectl("patch", "deployment", "resnet50-stable", "-n", namespace,
                        "--type=json", "-p", json.dumps(patch), "-o", "json").stdout
    )  # fmt: skip
    assert edited["spec"]["template"]["spec"] != template  # the edits landed

    def taken_back() -> dict[str, Any] | None:
        found = get(cluster, namespace, "deployment", "resnet50-stable") or {}
        return found if found["spec"]["template"]["spec"] == template else None

    wait_for("every edit taken back", taken_back, timeout=10)
    # Settled: the operator's passes (a resync every 3 s) write nothing more to it. (Its
    # resourceVersion still moves: the Deployment controller writes the rollout's status.)
    restored = datetime.datetime.now(datetime.UTC)
    time.sleep(3 * operator.resync_seconds)
    writes = [
        e["verb"]
        for e in cluster.audit_events()
        if e["userAgent"].startswith("modeldeploy-operator/")
        and e["objectRef"].get("resource") == "deployments"
        and e["objectRef"].get("namespace") == namespace
        and e["verb"] not in ("get", "list", "watch")
        and datetime.datetime.fromisoformat(e["requestReceivedTimestamp"]) > restored
    ]
    assert writes == []


HOT_LOOP = 30  # deletions of one child in a row


def test_a_hot_loop_makes_one_event_with_a_count_and_a_bounded_number_of_writes(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """Reliability case 30. Something deletes the Service again and again (a controller
    fighting the operator, say): each time it comes back, and each time is a Recreated
    Event, but they are one Event object whose count grows, as client-go's recorder
    aggregates; and past a burst of 25 writes for the object the rest are dropped (and
    counted), so a hot loop costs the API server a bounded number of writes."""
    apply(cluster, namespace, load_example("minimal.yaml"))
    wait_condition(cluster, namespace, "resnet50", "Ready", "True")
    dropped = metric_sum(operator.metrics(), "modeldeploy_events_dropped_total", reason="Recreated")

    for _ in range(HOT_LOOP):
        before = get(cluster, namespace, "service", "resnet50")
        assert before is not None
        cluster.kubectl("delete", "service", "resnet50", "-n", namespace)
        uid = before["metadata"]["uid"]
        wait_for(
            "the Service back",
            functools.partial(replaced, cluster, namespace, "service", "resnet50", uid),
            10,
        )
    events = [e for e in our_events(cluster, namespace) if e["reason"] == "Recreated"]
    assert len(events) == 1, [(e["metadata"]["name"], e["count"]) for e in events]
    count = events[0]["count"]
    assert events[0]["message"] == "Service resnet50 was deleted; created it again"
    now_dropped = metric_sum(
        operator.metrics(), "modeldeploy_events_dropped_total", reason="Recreated"
    )
    print(f"{HOT_LOOP} deletions: one Event, count {count}, {now_dropped - dropped:g} dropped")
    # Every deletion is either counted in the Event or counted as dropped: none is lost.
    assert count + (now_dropped - dropped) == HOT_LOOP
    assert 20 <= count <= 25
    assert len(our_events(cluster, namespace)) <= 4  # Ready, RolloutComplete, Recreated


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_refusal_that_stays_is_retried_with_doubling_backoff_at_little_cost(
    cluster: Cluster, own_operator: list[OperatorProcess], namespace: str, tmp_path: Path
) -> None:
    """Reliability case 16. A ResourceQuota allows no Deployment in the namespace, so every
    apply of the ModelDeployment's Deployment is refused (403) by the real API server. The
    operator reports ApplyFailed and sends the apply again after 10, 20, 40 s (the audit
    log has each attempt; it goes on doubling to every 5 minutes), while its resync, every
    5 s here, passes over the object without writing anything; its CPU stays under 5 % of
    a core."""
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-deployments"},
        "spec": {"hard": {"count/deployments.apps": "0"}},
    }
    apply(cluster, namespace, quota)
    process = start_scoped_operator(
        own_operator, cluster, namespace, tmp_path / "operator.log", resync_seconds=5
    )
    apply(cluster, namespace, cpu_model("refused"))
    wait_condition(cluster, namespace, "refused", "Degraded", "True", "ApplyFailed")
    time.sleep(1)  # the pass that reported it has posted its Events

    def failed_events() -> list[tuple[str, int]]:
        events = [e for e in our_events(cluster, namespace) if e["reason"] == "ApplyFailed"]
        return [(e["metadata"]["name"], e.get("count", 1)) for e in events]

    reported = failed_events()
    assert len(reported) == 1, reported  # Degraded's and Progressing's: one Event, counted
    assert process.pid is not None
    started, cpu = time.monotonic(), cpu_seconds(process.pid)

    def attempts() -> list[float]:
        """When each apply of the Deployment reached the API server (epoch seconds)."""
        return sorted(
            datetime.datetime.fromisoformat(e["requestReceivedTimestamp"]).timestamp()
            for e in cluster.audit_events()
            if e["userAgent"].startswith("modeldeploy-operator/")
            and e["objectRef"].get("resource") == "deployments"
            and e["objectRef"].get("namespace") == namespace
            and e["verb"] == "patch"
        )

    found = wait_for("four attempts", lambda: attempts() if len(attempts()) >= 4 else None, 100)
    used = (cpu_seconds(process.pid) - cpu) / (time.monotonic() - started)
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(found)][:3]
    print(f"attempts {gaps} s apart; the operator used {100 * used:.1f} % of a core")
    # 10, 20, 40 s: never before each is due (how late is the machine's load, not the
    # operator's; the schedule itself is tested on a fake clock in test_workqueue.py).
    for gap, due in zip(gaps, (10, 20, 40), strict=True):
        assert gap >= due - 1, gaps
    assert used < 0.05
    # Nothing else was written meanwhile: the status said ApplyFailed once.
    md = get(cluster, namespace, "md", "refused") or {}
    assert md["status"]["observedGeneration"] == 1
    assert failed_events() == reported  # and not one more since


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
