"""`make bench-operator`: the operator's cost, measured beside its floor in one run.

1. Apply-to-Available latency: a ModelDeployment until its Deployment is Available, against
   the same Deployment applied directly (the native controller is the floor). Samples of the
   two alternate, so machine noise hits both alike; we report medians, p95 and their ratios.
2. Cold start: the operator starts against N ModelDeployments nobody has reconciled yet; time
   until every one has its status written (observedGeneration caught up), and until every
   one is Available; the operator's peak RSS.
3. Idle cost: with nothing changing, mutating requests and resourceVersion changes per
   ModelDeployment per hour, read from the operator's own request counter.

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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from report import markers, percentile, write_section  # noqa: E402

from localcluster import Cluster, ClusterState, Toolchain  # noqa: E402
from localcluster.nodes import NodeSpec, node_manifest  # noqa: E402
from localcluster.operator import OperatorProcess, metric_sum  # noqa: E402
from modeldeploy_operator.api.v1alpha1 import ModelDeployment  # noqa: E402
from modeldeploy_operator.builders.deployment import BuildConfig, build_deployment  # noqa: E402
from modeldeploy_operator.builders.labels import revision_of  # noqa: E402

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


def example(name: str, gpu: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": NAMESPACE}
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


def all_status(cluster: Cluster) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cluster.kubectl_json("get", "md", "-n", NAMESPACE)["items"]
    return items


def cold_start(cluster: Cluster, operator: OperatorProcess, count: int) -> dict[str, float]:
    operator.stop()
    docs = [example(f"cold-{i:04d}", gpu=False) for i in range(count)]
    for start in range(0, count, 100):
        cluster.kubectl(
            "apply",
            "--server-side",
            "-f",
            "-",
            stdin=yaml.safe_dump_all(docs[start : start + 100]),
            timeout=300,
        )
    started = time.monotonic()
    operator.start()
    wait(
        lambda: (
            sum(
                1
                for i in all_status(cluster)
                if i.get("status", {}).get("observedGeneration") == i["metadata"]["generation"]
            )
            == count
        ),
        timeout=1800,
        poll=1.0,
    )
    reconciled = time.monotonic() - started
    wait(
        lambda: (
            sum(1 for i in all_status(cluster) if i.get("status", {}).get("phase") == "Available")
            == count
        ),
        timeout=1800,
        poll=1.0,
    )
    available = time.monotonic() - started
    rss = peak_rss_mib(operator.pid)
    return {"reconciled_s": reconciled, "available_s": available, "peak_rss_mib": rss}


def peak_rss_mib(pid: int | None) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def versions(cluster: Cluster) -> dict[str, str]:
    items = cluster.kubectl_json("get", "modeldeployments,deployments,services", "-n", NAMESPACE)[
        "items"
    ]
    return {f"{i['kind']}/{i['metadata']['name']}": i["metadata"]["resourceVersion"] for i in items}


def idle(
    cluster: Cluster, operator: OperatorProcess, count: int, seconds: float
) -> dict[str, float]:
    before_rv = versions(cluster)
    before = operator.metrics()
    time.sleep(seconds)
    after = operator.metrics()
    after_rv = versions(cluster)
    hours = seconds / 3600
    writes = metric_sum(after, "modeldeploy_api_requests_total", verb=WRITE_VERBS) - metric_sum(
        before, "modeldeploy_api_requests_total", verb=WRITE_VERBS
    )
    reads = metric_sum(after, "modeldeploy_api_requests_total", verb="GET") - metric_sum(
        before, "modeldeploy_api_requests_total", verb="GET"
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
    cold, idle_ = results["cold_start"], results["idle"]
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
        f"**Cold start** with {results['count']} unreconciled ModelDeployments"
        " (CPU-only, 1 replica):",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| operator start to every status written | {cold['reconciled_s']:.1f} s |",
        f"| operator start to every ModelDeployment Available | {cold['available_s']:.1f} s |",
        f"| operator peak RSS | {cold['peak_rss_mib']:.0f} MiB |",
        "",
        f"**Idle** ({idle_['window_s']:.0f} s window, resync every {results['resync_s']:.0f} s,"
        " nothing changing):",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| API writes per ModelDeployment per hour | {idle_['writes_per_md_hour']:.2f} |",
        f"| resourceVersion changes (ModelDeployments and children) | {idle_['rv_changes']:.0f} |",
        f"| API reads per ModelDeployment per hour | {idle_['reads_per_md_hour']:.0f} |",
        END,
    ]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--idle-seconds", type=float, default=120.0)
    parser.add_argument("--resync-seconds", type=float, default=30.0)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()

    cluster = Cluster(Toolchain.locate(), ClusterState.default())
    started_here = cluster.up()
    extra_nodes = [NodeSpec(f"bench-cpu-{i}", cpu="64", memory="256Gi", pods=250) for i in range(3)]
    operator = OperatorProcess(
        cluster,
        cluster.state.root / "bench-operator.log",
        resync_seconds=args.resync_seconds,
        extra_args=(f"--namespace={NAMESPACE}",),
    )
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=30s")
        cluster.kubectl("create", "namespace", NAMESPACE)
        cluster.kubectl(
            "apply", "-f", "-", stdin=yaml.safe_dump_all([node_manifest(n) for n in extra_nodes])
        )
        operator.start()
        print(f"[bench] latency: {args.samples} samples each", flush=True)
        lat = latency(cluster, args.samples)
        print(f"[bench] cold start with {args.count} ModelDeployments", flush=True)
        cold = cold_start(cluster, operator, args.count)
        print(f"[bench] idle for {args.idle_seconds:.0f}s", flush=True)
        quiet = idle(cluster, operator, args.count, args.idle_seconds)
    finally:
        operator.stop()
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        for node in extra_nodes:
            cluster.kubectl("delete", "node", node.name, "--wait=false", check=False)
        if started_here:
            cluster.down()
    results = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "kubernetes": cluster.toolchain.versions.kubernetes,
        "latency": lat,
        "count": args.count,
        "cold_start": cold,
        "idle": quiet,
        "resync_s": args.resync_seconds,
    }
    section = render(results)
    print(section)
    print(json.dumps({"cold_start": cold, "idle": quiet}, indent=2))
    write_section(args.output, "operator-bench", "Operator", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
