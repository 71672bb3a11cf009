"""`make bench-activation`: what the activator adds to a wake from zero, on real pods.

Side by side in one run, on the local cluster's real node with the chart's operator and
activator pods, iris (examples/iris-scale-to-zero.yaml) put to sleep before each sample:

- **The floor: the pod's own start.** The scale raised by hand (`kubectl scale`, as a user
  without an activator would), and the pod's sidecar polled directly every 50 ms: from the
  scale-up to the first answer. Nothing faster can answer a request that arrives at zero.
- **Ours: a request through the Service.** One inference sent to the model's Service at zero:
  the activator holds it, raises the scale and forwards it to the first Ready pod; from the
  request to its answer.

The difference is the activator's cost (the issue's bound: 1 s). Both start from the same
state: 0 pods, the Service behind the activator, the images on the node.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

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
from realnode_support import SETOSA, pods, post_infer, reaches_the_activator  # noqa: E402
from support import load_example, merged  # noqa: E402

BEGIN, END = markers("activation-bench")


def answers(address: str) -> bool:
    try:
        return post_infer(address, [SETOSA], timeout=2).status == 200
    except OSError:
        return False


def asleep(cluster: Cluster, namespace: str) -> bool:
    slice_ = cluster.kubectl(
        "get", "endpointslice", "iris-activator", "-n", namespace, check=False
    ).returncode
    return slice_ == 0 and not pods(cluster, namespace)


def put_to_sleep(cluster: Cluster, namespace: str, address: str) -> None:
    cluster.kubectl("scale", "md", "iris", "-n", namespace, "--replicas=0")
    wait("iris at zero behind the activator", lambda: asleep(cluster, namespace), 180, 0.5)
    wait("the Service reaching the activator", lambda: reaches_the_activator(address), 30)


def pod_start(cluster: Cluster, namespace: str) -> float:
    """The pod's own creation to Ready, from its timestamps (1 s resolution)."""
    (pod,) = [p for p in pods(cluster, namespace) if not p["metadata"].get("deletionTimestamp")]
    created = dt.datetime.fromisoformat(pod["metadata"]["creationTimestamp"])
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    return (dt.datetime.fromisoformat(ready["lastTransitionTime"]) - created).total_seconds()


def by_hand(cluster: Cluster, namespace: str) -> float:
    """The floor: scale up, poll the pod's sidecar directly until it answers."""
    started = time.monotonic()
    cluster.kubectl("scale", "md", "iris", "-n", namespace, "--replicas=1")

    def pod_ip() -> str | None:
        for pod in pods(cluster, namespace):
            if not pod["metadata"].get("deletionTimestamp") and pod["status"].get("podIP"):
                return str(pod["status"]["podIP"])
        return None

    ip = wait("a pod address", pod_ip, 300)
    wait("the pod answering", lambda: answers(f"{ip}:8080"), 300, 0.05)
    return time.monotonic() - started


def through_the_activator(address: str) -> float:
    answer = post_infer(address, [SETOSA], timeout=300)
    if answer.status != 200:
        raise RuntimeError(f"the held request was answered {answer.status}")
    return answer.elapsed


def render(results: dict[str, list[float]], date: str) -> str:
    floor, ours = results["by_hand"], results["activator"]
    added = [o - f for o, f in zip(ours, floor, strict=True)]
    rows = [
        BEGIN,
        f"Measured {date} on the real node (kubelet + containerd + runc, CPU Triton, the"
        " chart's operator and 2 activator replicas). `make bench-activation` regenerates it.",
        "",
        "**A wake from zero** (iris, `minReplicas: 1`; each sample starts at 0 pods with the"
        " Service behind the activator; the two paths alternate):",
        "",
        "| path | samples | median | min | max |",
        "| --- | --- | --- | --- | --- |",
        f"| floor: `kubectl scale` to the pod's first answer (polled every 50 ms, straight"
        f" at the pod) | {len(floor)} | {statistics.median(floor):.1f} s | {min(floor):.1f} s"
        f" | {max(floor):.1f} s |",
        f"| ours: a request to the Service at zero, held by the activator, to its answer"
        f" | {len(ours)} | {statistics.median(ours):.1f} s | {min(ours):.1f} s"
        f" | {max(ours):.1f} s |",
        f"| the activator's cost (ours minus the floor, per pair) | {len(added)} |"
        f" {statistics.median(added):+.2f} s | {min(added):+.2f} s | {max(added):+.2f} s |",
        f"| the pod's own start (creation to Ready, from its timestamps: 1 s steps) |"
        f" {len(results['pod_start'])} | {statistics.median(results['pod_start']):.0f} s |"
        f" {min(results['pod_start']):.0f} s | {max(results['pod_start']):.0f} s |",
        "",
        "The cost is the operator's pass that publishes the Ready pod's address"
        " (`status.activation`), the watch that brings it to the activator, and the forward;"
        " against it, the floor includes `kubectl`'s own start and the client's polling.",
        END,
    ]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3, help="per path, alternating")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    cluster = Cluster(Toolchain.locate(), ClusterState.default())
    cluster.up()
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    install_operator(cluster, prometheus_url=ClusterPrometheus(cluster).ensure_started())
    namespace = f"bench-activation-{int(time.time() * 1000) % 10_000_000}"
    cluster.kubectl("create", "namespace", namespace)
    serve_model_store(cluster, namespace, [ROOT / "examples" / "models"])
    manifest = merged(
        load_example("iris-scale-to-zero.yaml"),
        {"spec": {"replicas": 0, "autoscaling": {"scaleToZero": {"idleAfter": "1h"}}}},
    )
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest))
    results: dict[str, list[float]] = {"by_hand": [], "activator": [], "pod_start": []}
    try:
        wait("iris at zero behind the activator", lambda: asleep(cluster, namespace), 180, 0.5)
        address = service_address(cluster, namespace, "iris")
        wait("the Service reaching the activator", lambda: reaches_the_activator(address), 30)
        for sample in range(args.samples):
            for path in ("by_hand", "activator"):
                took = (
                    by_hand(cluster, namespace)
                    if path == "by_hand"
                    else (through_the_activator(address))
                )
                results[path].append(took)
                results["pod_start"].append(pod_start(cluster, namespace))
                print(f"[bench] sample {sample + 1} {path}: {took:.2f}s", flush=True)
                put_to_sleep(cluster, namespace, address)
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", f"model-store-{namespace}", "--wait=false", check=False)
    section = render(results, dt.date.today().isoformat())
    print(section)
    write_section(args.output, "activation-bench", "Scale from zero", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
