"""`make bench-realnode`: serving and rollouts measured on real pods (the real node).

Side by side in one run, on the local cluster's real node with the chart's operator pod:

1. **Apply to first answered inference.** The floor is a bare Deployment and Service with the
   very pod spec the operator generates (fetch init container, Triton, sidecar), applied with
   kubectl; ours is the ModelDeployment. The ratio is the operator's overhead on real pods.
   The first ModelDeployment of the run is reported apart: the first pods on the node after
   its images were imported (cold), the rest warm.
2. **A whole canary rollout** (version 1 -> 2, one 50 % step paused 30 s, then 100 %, analysis
   every 10 s) under a steady client: patch to promoted, next to the configured pause (the
   floor a perfect controller needs), and the client's failed requests.
3. **Rollback**: a canary that fails every request (iris version 3): from the first failed
   analysis check to zero canary pods, and from the patch to the first failed check.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from report import markers, wait, write_section  # noqa: E402

from localcluster import Cluster, ClusterState, Toolchain  # noqa: E402
from localcluster.dataplane import (  # noqa: E402
    ClusterPrometheus,
    install_operator,
    serve_model_store,
    service_address,
)
from modeldeploy_operator.api.v1alpha1 import ModelDeployment  # noqa: E402
from modeldeploy_operator.builders.deployment import BuildConfig, build_deployment  # noqa: E402
from modeldeploy_operator.builders.service import build_service  # noqa: E402
from realnode_support import SteadyLoad, answering, iris, md_status, pods  # noqa: E402

BEGIN, END = markers("realnode-bench")
PAUSE_SECONDS = 30


def service_exists(cluster: Cluster, namespace: str) -> bool:
    return cluster.kubectl("get", "service", "iris", "-n", namespace, check=False).returncode == 0


def fresh_namespace(cluster: Cluster, stem: str) -> str:
    namespace = f"{stem}-{int(time.time() * 1000) % 10_000_000}"
    cluster.kubectl("create", "namespace", namespace)
    serve_model_store(
        cluster, namespace, [ROOT / "examples" / "models", ROOT / "tests" / "realnode" / "models"]
    )
    return namespace


def cleanup(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("delete", "namespace", namespace, "--wait=true", check=False, timeout=180)
    cluster.kubectl("delete", "pv", f"model-store-{namespace}", "--wait=false", check=False)


def bare_manifests(cluster: Cluster, namespace: str) -> str:
    """The operator's own Deployment and Service for iris v1, without the operator."""
    body = json.loads(iris("1", 1))
    body["metadata"]["namespace"] = namespace
    md = ModelDeployment.model_validate(body)
    config = BuildConfig(runtime_image=cluster.image("runtime"))
    deployment = build_deployment(md, "stable", "bench", config)
    service = build_service(md)
    for obj in (deployment, service):
        obj["metadata"].pop("ownerReferences", None)
    return yaml.safe_dump_all([deployment, service])


def apply_to_answer(cluster: Cluster, bare: bool) -> float:
    namespace = fresh_namespace(cluster, "bench-bare" if bare else "bench-md")
    try:
        started = time.monotonic()
        if bare:
            cluster.kubectl(
                "apply", "-n", namespace, "-f", "-", stdin=bare_manifests(cluster, namespace)
            )
        else:
            cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=iris("1", 1))
        wait("the Service", lambda: service_exists(cluster, namespace), 60, period=0.05)
        address = service_address(cluster, namespace, "iris")
        wait("an answer", lambda: answering(address), 300, period=0.05)
        return time.monotonic() - started
    finally:
        cleanup(cluster, namespace)


def canary_pods(cluster: Cluster, namespace: str) -> int:
    return sum(
        1
        for p in pods(cluster, namespace)
        if p["metadata"]["labels"].get("serving.modeldeploy.io/track") == "canary"
    )


def serve_version_1(cluster: Cluster, namespace: str) -> str:
    """iris version 1 with 2 replicas, Available and answering; returns its address."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=iris("1", 2))
    wait("the Service", lambda: service_exists(cluster, namespace), 60)
    address = service_address(cluster, namespace, "iris")
    wait("version 1 answering", lambda: answering(address, "1"), 300)
    wait(
        "version 1 Available",
        lambda: md_status(cluster, namespace).get("phase") == "Available",
        120,
    )
    return address


def roll_to(cluster: Cluster, namespace: str, version: str) -> None:
    storage = f"pvc://model-store/iris/{version}"
    patch = {"spec": {"model": {"version": version, "storageUri": storage}}}
    cluster.kubectl("patch", "md", "iris", "-n", namespace, "--type=merge", "-p", json.dumps(patch))


def rollout(cluster: Cluster) -> dict[str, float]:
    namespace = fresh_namespace(cluster, "bench-rollout")
    try:
        address = serve_version_1(cluster, namespace)
        with SteadyLoad(address) as load:
            time.sleep(2)
            started = time.monotonic()
            roll_to(cluster, namespace, "2")

            def promoted() -> bool:
                status = md_status(cluster, namespace)
                return status.get("stable", {}).get("version") == "2" and not status.get("canary")

            wait("promoted", promoted, 400, period=0.25)
            took = time.monotonic() - started
            wait(
                "ready again", lambda: md_status(cluster, namespace).get("readyReplicas") == 2, 120
            )
        return {"seconds": took, "requests": len(load.outcomes), "failed": len(load.failures)}
    finally:
        cleanup(cluster, namespace)


def rollback(cluster: Cluster) -> dict[str, float]:
    namespace = fresh_namespace(cluster, "bench-rollback")
    try:
        address = serve_version_1(cluster, namespace)
        with SteadyLoad(address):
            started = time.monotonic()
            roll_to(cluster, namespace, "3")  # fails every inference

            def failed_check() -> bool:
                status = md_status(cluster, namespace)
                history = status.get("history") or [{}]
                return any(a.get("result") == "Failed" for a in status.get("analysis") or []) or (
                    history[-1].get("result") == "RolledBack"
                )

            wait("a failed check", failed_check, 300, period=0.1)
            first_failed = time.monotonic()
            wait("no canary pod", lambda: canary_pods(cluster, namespace) == 0, 120, period=0.1)
            gone = time.monotonic()
        return {"to_failed_check": first_failed - started, "to_zero_canary": gone - first_failed}
    finally:
        cleanup(cluster, namespace)


def render(results: dict[str, Any], date: str) -> str:
    bare, ours = results["bare"], results["md"]
    cold, warm = ours[0], ours[1:] or ours
    floor = statistics.median(bare)
    median = statistics.median(warm)
    r, b = results["rollout"], results["rollback"]
    first_label = (
        "cold (first pods after the images were imported)"
        if results["fresh"]
        else "first of this run (the cluster had run pods before)"
    )
    rows = [
        BEGIN,
        f"Measured {date} on the real node (kubelet + containerd + runc, CPU Triton, the chart's"
        " operator pod, Prometheus scraping every 2 s). `make bench-realnode` regenerates it.",
        "",
        "**Apply to first answered inference** (iris, 1 replica; fetch, Triton start, model"
        " load, readiness; the client polls every 50 ms):",
        "",
        "| path | samples | median | min | max |",
        "| --- | --- | --- | --- | --- |",
        f"| bare Deployment + Service, same pod spec (floor) | {len(bare)} | {floor:.1f} s"
        f" | {min(bare):.1f} s | {max(bare):.1f} s |",
        f"| ModelDeployment, warm (pods of these images ran before) | {len(warm)} |"
        f" {median:.1f} s | {min(warm):.1f} s | {max(warm):.1f} s |",
        f"| ModelDeployment, {first_label} | 1 | {cold:.1f} s | | |",
        f"| ratio warm / floor | | {median / floor:.2f}x | | |",
        "",
        "**A whole canary rollout** (2 replicas, version 1 -> 2, one 50 % step paused"
        f" {PAUSE_SECONDS} s, then 100 %, analysis every 10 s, a client sending 10 requests/s):",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| patch to promoted | {r['seconds']:.1f} s |",
        f"| configured pause (the floor) | {PAUSE_SECONDS} s |",
        f"| ratio | {r['seconds'] / PAUSE_SECONDS:.2f}x |",
        f"| failed client requests | {r['failed']:.0f} of {r['requests']:.0f} |",
        "",
        "**Rollback** of a canary that fails every request (ErrorRatio, failureLimit 3, 10 s"
        " interval):",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| patch to the first failed check | {b['to_failed_check']:.1f} s |",
        f"| first failed check to zero canary pods | {b['to_zero_canary']:.1f} s |",
        END,
    ]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3, help="per path, alternating")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    cluster = Cluster(Toolchain.locate(), ClusterState.default())
    fresh = cluster.up()
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    install_operator(cluster, prometheus_url=ClusterPrometheus(cluster).ensure_started())
    results: dict[str, Any] = {"bare": [], "md": []}
    for sample in range(args.samples):
        for bare in (False, True):
            seconds = apply_to_answer(cluster, bare)
            results["bare" if bare else "md"].append(seconds)
            print(
                f"[bench] sample {sample + 1} {'bare' if bare else 'md'}: {seconds:.1f}s",
                flush=True,
            )
    results["rollout"] = rollout(cluster)
    print(f"[bench] rollout: {results['rollout']}", flush=True)
    results["rollback"] = rollback(cluster)
    print(f"[bench] rollback: {results['rollback']}", flush=True)
    results["fresh"] = fresh
    section = render(results, dt.date.today().isoformat())
    print(section)
    write_section(args.output, "realnode-bench", "Real pods", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
