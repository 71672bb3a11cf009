"""`make bench-operator`: the operator's cost, measured beside its floor in one run.

1. Apply-to-Available latency: a ModelDeployment until its Deployment is Available, against
   the same Deployment applied directly (the native controller is the floor). Samples of the
   two alternate, so machine noise hits both alike; we report medians, p95 and their ratios.
2. Cold start, at each of ``--counts`` (1,000 and 10,000 by default, each in its own
   namespace): the operator starts against N ModelDeployments nobody has reconciled yet;
   time until every one has its status written (observedGeneration caught up), until every
   one is Available (up to 1,000: beyond, kube-controller-manager's pod creation dominates),
   and the operator's peak RSS. Beside it, in the same run, its floor: a client doing only
   a first pass's writes for each object with as many workers. Each phase's namespace is
   deleted, and gone, before the next phase starts.
3. Idle cost, at the first count: with nothing changing, the operator's own API reads and
   writes per ModelDeployment per hour (its request counter; kopf's watch streams are not
   requests it makes per object) and resourceVersion changes.

Results go to docs/benchmarks.md (between the operator markers) and stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from report import markers, percentile, write_section  # noqa: E402

from localcluster import Cluster, ClusterState, Toolchain  # noqa: E402
from localcluster.nodes import NodeSpec, node_manifest  # noqa: E402
from localcluster.operator import OperatorProcess, metric_sum  # noqa: E402
from modeldeploy_operator.api.v1alpha1 import ModelDeployment  # noqa: E402
from modeldeploy_operator.builders.deployment import BuildConfig, build_deployment  # noqa: E402
from modeldeploy_operator.builders.labels import revision_of  # noqa: E402
from modeldeploy_operator.builders.service import build_service  # noqa: E402
from modeldeploy_operator.k8s.client import KubernetesApi, load_api_client  # noqa: E402

BEGIN, END = markers("operator-bench")
WRITE_VERBS = "APPLY|PATCH|POST|PUT|DELETE"
NAMESPACE = "bench"


def wait(check: Callable[[], bool], timeout: float, poll: float = 0.05) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not done after {timeout}s")
        time.sleep(poll)
    return time.monotonic() - started


def example(name: str, namespace: str = NAMESPACE, gpu: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["model"]["name"] = name.replace("-", "_")
    if not gpu:
        del doc["spec"]["resources"]
    return doc


def bare_deployment(name: str) -> dict[str, Any]:
    """What the operator would build for the same spec, applied without the operator."""
    md = ModelDeployment.model_validate(example(name))
    built = build_deployment(
        md, "stable", revision_of(md, "img"), BuildConfig(runtime_image="runtime:bench")
    )
    built["metadata"].pop("ownerReferences")
    built["metadata"]["name"] = name
    return built


def deployment_available(cluster: Cluster, name: str) -> bool:
    result = cluster.kubectl(
        "get",
        "deployment",
        name,
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.status.conditions[?(@.type=='Available')].status}",
        check=False,
    )
    return result.stdout.strip() == "True"


def latency(cluster: Cluster, samples: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"modeldeployment": [], "deployment": []}
    for i in range(samples):
        for kind in (
            ("modeldeployment", "deployment") if i % 2 == 0 else ("deployment", "modeldeployment")
        ):
            name = f"lat-{kind[:2]}-{i}"
            manifest = example(name) if kind == "modeldeployment" else bare_deployment(name)
            child = f"{name}-stable" if kind == "modeldeployment" else name

            def available(child: str = child) -> bool:
                return deployment_available(cluster, child)

            started = time.monotonic()
            cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
            wait(available, 60)
            times[kind].append(time.monotonic() - started)
            kind_name = "md" if kind == "modeldeployment" else "deployment"
            cluster.kubectl("delete", kind_name, name, "-n", NAMESPACE, "--wait=true", timeout=120)
        # Free the GPUs before the next pair.
        wait(lambda: not cluster.kubectl_json("get", "pods", "-n", NAMESPACE)["items"], 60, 0.2)
    return times


class Progress:
    """Every ModelDeployment of a namespace as one watch stream sees it: when all had their
    status written (observedGeneration caught up) and when all were Available. A watch costs
    the API server and this machine next to nothing; listing 10,000 objects every second
    would load both and slow the very thing measured."""

    def __init__(self, cluster: Cluster, namespace: str, count: int) -> None:
        self.namespace, self.count = namespace, count
        api_client = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(cluster.state.kubeconfig)
        )
        self.api = k8s.CustomObjectsApi(api_client)
        self.seen: dict[str, tuple[bool, bool]] = {}  # name -> (reconciled, available)
        self.reconciled_at: float | None = None
        self.available_at: float | None = None
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="progress")

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _note(self, item: dict[str, Any]) -> None:
        meta, status = item["metadata"], item.get("status") or {}
        self.seen[meta["name"]] = (
            status.get("observedGeneration") == meta.get("generation"),
            status.get("phase") == "Available",
        )
        now = time.monotonic() - self.started
        if self.reconciled_at is None and sum(r for r, _ in self.seen.values()) == self.count:
            self.reconciled_at = now
        if self.available_at is None and sum(a for _, a in self.seen.values()) == self.count:
            self.available_at = now

    def _run(self) -> None:
        group, version, plural = "serving.modeldeploy.io", "v1alpha1", "modeldeployments"
        while not self._stop.is_set():
            listed: Any = self.api.list_namespaced_custom_object(
                group, version, self.namespace, plural
            )
            for item in listed["items"]:
                self._note(item)
            stream = k8s_watch.Watch().stream(  # type: ignore[no-untyped-call]
                self.api.list_namespaced_custom_object,
                group,
                version,
                self.namespace,
                plural,
                resource_version=listed["metadata"]["resourceVersion"],
                timeout_seconds=60,
            )
            event: dict[str, Any]
            for event in stream:
                if event["type"] in ("ADDED", "MODIFIED"):
                    self._note(event["object"])
                if self._stop.is_set():
                    break

    def wait(self, what: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = self.reconciled_at if what == "reconciled" else self.available_at
            if done is not None:
                return done
            time.sleep(0.2)
        raise TimeoutError(f"not every ModelDeployment {what} within {timeout:.0f} s")


def cold_start(
    cluster: Cluster, operator: OperatorProcess, namespace: str, count: int
) -> dict[str, float]:
    operator.stop()
    create_unreconciled(cluster, namespace, count)
    progress = Progress(cluster, namespace, count)
    progress.start()
    operator.start()
    try:
        reconciled = progress.wait("reconciled", timeout=3600)
        rss = peak_rss_mib(operator.pid)
        available = progress.wait("available", timeout=1800) if count <= 1000 else float("nan")
    finally:
        progress.stop()
    return {"reconciled_s": reconciled, "available_s": available, "peak_rss_mib": rss}


def create_unreconciled(cluster: Cluster, namespace: str, count: int) -> list[dict[str, Any]]:
    docs = [example(f"cold-{i:05d}", namespace, gpu=False) for i in range(count)]
    for start in range(0, count, 200):
        cluster.kubectl(
            "apply",
            "--server-side",
            "-f",
            "-",
            stdin=yaml.safe_dump_all(docs[start : start + 200]),
            timeout=600,
        )
    return docs


def floor_start(cluster: Cluster, namespace: str, count: int, workers: int) -> float:
    """The floor of a cold start: a client that already knows what to write does exactly a
    first pass's requests for each of ``count`` ModelDeployments (the status, the
    Deployment and the Service, server-side applied, through the operator's own HTTP client)
    with the operator's number of workers, and no watch, cache or decision. Seconds until
    every status is written."""
    docs = create_unreconciled(cluster, namespace, count)
    api = KubernetesApi(load_api_client(str(cluster.state.kubeconfig)))
    build = BuildConfig(runtime_image="runtime:bench")

    def first_pass(doc: dict[str, Any]) -> None:
        written = api.patch_status(namespace, doc["metadata"]["name"], {"observedGeneration": 1})
        md = ModelDeployment.model_validate(written)  # with its uid, for the owner references
        api.apply(build_deployment(md, "stable", revision_of(md, "runtime:bench"), build))
        api.apply(build_service(md))

    started = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(first_pass, docs))
    return time.monotonic() - started


def settle(cluster: Cluster, namespace: str) -> None:
    """Delete a namespace and wait until it and its pods are gone, so the next phase does
    not share the machine with their garbage collection."""
    cluster.kubectl("delete", "namespace", namespace, "--wait=true", timeout=900, check=False)


def cold_and_floor(
    cluster: Cluster, operator: OperatorProcess, count: int, workers: int
) -> dict[str, float]:
    print(f"[bench] floor with {count} ModelDeployments", flush=True)
    floor_ns = f"{NAMESPACE}-floor-{count}"
    floor = floor_start(cluster, floor_ns, count, workers)
    settle(cluster, floor_ns)
    print(f"[bench] cold start with {count} ModelDeployments", flush=True)
    return {"floor_s": floor, **cold_start(cluster, operator, f"{NAMESPACE}-{count}", count)}


def peak_rss_mib(pid: int | None) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def versions(cluster: Cluster, namespace: str) -> dict[str, str]:
    items = cluster.kubectl_json("get", "modeldeployments,deployments,services", "-n", namespace)[
        "items"
    ]
    return {f"{i['kind']}/{i['metadata']['name']}": i["metadata"]["resourceVersion"] for i in items}


def idle(
    cluster: Cluster, operator: OperatorProcess, namespace: str, count: int, seconds: float
) -> dict[str, float]:
    before_rv = versions(cluster, namespace)
    before = operator.metrics()
    time.sleep(seconds)
    after = operator.metrics()
    after_rv = versions(cluster, namespace)
    hours = seconds / 3600
    # The leader Lease's renewals (a GET and a PUT every 2 s) are not reconcile traffic.
    ours = {"kind": "(?!Lease$).*"}
    writes = metric_sum(
        after, "modeldeploy_api_requests_total", verb=WRITE_VERBS, **ours
    ) - metric_sum(before, "modeldeploy_api_requests_total", verb=WRITE_VERBS, **ours)
    reads = metric_sum(after, "modeldeploy_api_requests_total", verb="GET", **ours) - metric_sum(
        before, "modeldeploy_api_requests_total", verb="GET", **ours
    )
    changed = sum(1 for k, v in after_rv.items() if before_rv.get(k) != v)
    return {
        "writes_per_md_hour": writes / count / hours,
        "reads_per_md_hour": reads / count / hours,
        "rv_changes": float(changed),
        "window_s": seconds,
    }


def render(results: dict[str, Any]) -> str:
    lat = results["latency"]
    md, dep = lat["modeldeployment"], lat["deployment"]
    colds, idle_ = results["cold_start"], results["idle"]
    rows = [
        BEGIN,
        f"Measured {results['date']} on {results['machine']}, Kubernetes {results['kubernetes']}"
        f" (local control plane, kwok nodes). `make bench-operator` regenerates this section.",
        "",
        f"**Apply to Available** ({len(md)} samples each, alternating; the floor is the same"
        " Deployment applied directly, so the ratio is the operator's overhead):",
        "",
        "| path | median | p95 |",
        "| --- | --- | --- |",
        f"| bare Deployment (floor) | {statistics.median(dep) * 1000:.0f} ms"
        f" | {percentile(dep, 0.95) * 1000:.0f} ms |",
        f"| ModelDeployment via the operator | {statistics.median(md) * 1000:.0f} ms"
        f" | {percentile(md, 0.95) * 1000:.0f} ms |",
        f"| ratio | {statistics.median(md) / statistics.median(dep):.2f}x"
        f" | {percentile(md, 0.95) / percentile(dep, 0.95):.2f}x |",
        "",
        "**Cold start**: unreconciled ModelDeployments (CPU-only, 1 replica), the operator"
        " started against them. The floor, measured in the same run in its own namespace, is"
        f" a client doing just a first pass's writes for each (status, Deployment, Service) with"
        f" the operator's {results['workers']} workers: no watch, no cache, no decision.",
        "",
        "| ModelDeployments | floor: every status written | operator: every status written"
        " | ratio | operator: every one Available | operator peak RSS |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {count:,} | {cold['floor_s']:.1f} s | {cold['reconciled_s']:.1f} s"
            f" | {cold['reconciled_s'] / cold['floor_s']:.2f}x | "
            + (
                f"{cold['available_s']:.1f} s"
                if cold["available_s"] == cold["available_s"]
                else "not measured"
            )
            + f" | {cold['peak_rss_mib']:.0f} MiB |"
            for count, cold in colds
        ),
        "",
        f"**Idle** with {results['idle_count']:,} ModelDeployments ({idle_['window_s']:.0f} s"
        f" window, resync every {results['resync_s']:.0f} s, nothing changing):",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| API writes per ModelDeployment per hour | {idle_['writes_per_md_hour']:.2f} |",
        f"| resourceVersion changes (ModelDeployments and children) | {idle_['rv_changes']:.0f} |",
        f"| API reads per ModelDeployment per hour | {idle_['reads_per_md_hour']:.2f} |",
        END,
    ]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument(
        "--counts",
        default="1000,10000",
        help="comma-separated ModelDeployment counts for the cold start (idle at the first)",
    )
    parser.add_argument("--idle-seconds", type=float, default=120.0)
    parser.add_argument("--resync-seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=4, help="the operator's --workers")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()

    counts = [int(c) for c in args.counts.split(",")]
    # Simulated nodes only: a real node's kubelet and containerd would only add noise here.
    cluster = Cluster(Toolchain.locate(), ClusterState.default(), real_node=None)
    started_here = cluster.up()
    # Room for a pod per ModelDeployment on simulated nodes.
    extra_nodes = [
        NodeSpec(f"bench-cpu-{i}", cpu="512", memory="2048Gi", pods=1100)
        for i in range(max(3, -(-max(counts) // 1000)))
    ]
    namespaces = [NAMESPACE, *(f"{NAMESPACE}-{count}" for count in counts)]
    namespaces += [f"{NAMESPACE}-floor-{count}" for count in counts]

    def operator_for(namespace: str) -> OperatorProcess:
        return OperatorProcess(
            cluster,
            cluster.state.root / f"{namespace}-operator.log",
            resync_seconds=args.resync_seconds,
            extra_args=(f"--namespace={namespace}", f"--workers={args.workers}"),
        )

    operator = operator_for(NAMESPACE)
    colds: list[tuple[int, dict[str, float]]] = []
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        cluster.wait_established(30)
        for namespace in namespaces:
            cluster.kubectl("create", "namespace", namespace)
        cluster.kubectl(
            "apply", "-f", "-", stdin=yaml.safe_dump_all([node_manifest(n) for n in extra_nodes])
        )
        operator.start()
        print(f"[bench] latency: {args.samples} samples each", flush=True)
        lat = latency(cluster, args.samples)
        operator.stop()
        quiet: dict[str, float] = {}
        for count in counts:
            namespace = f"{NAMESPACE}-{count}"
            operator = operator_for(namespace)
            colds.append((count, cold_and_floor(cluster, operator, count, args.workers)))
            print(f"[bench] {colds[-1]}", flush=True)
            if not quiet:
                print(f"[bench] idle for {args.idle_seconds:.0f}s", flush=True)
                quiet = idle(cluster, operator, namespace, count, args.idle_seconds)
            operator.stop()
            settle(cluster, namespace)
    finally:
        operator.stop()
        for namespace in namespaces:
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        for node in extra_nodes:
            cluster.kubectl("delete", "node", node.name, "--wait=false", check=False)
        if started_here:
            cluster.down()
    results = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "kubernetes": cluster.toolchain.versions.kubernetes,
        "latency": lat,
        "cold_start": colds,
        "idle": quiet,
        "idle_count": counts[0],
        "resync_s": args.resync_seconds,
        "workers": args.workers,
    }
    section = render(results)
    print(section)
    print(json.dumps({"cold_start": colds, "idle": quiet}, indent=2))
    write_section(args.output, "operator-bench", "Operator", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
