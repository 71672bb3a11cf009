"""`make bench-autoscale`: how fast the builtin engine reacts to a load step up and down.

The same machinery as the end-to-end autoscaling test: the local cluster, the operator, a
real Triton, two sidecars playing the pods and a real Prometheus scraping them every 1 s.
Eight closed-loop clients keep eight requests in flight against a target of two per
replica (1 -> 4 replicas), then stop (4 -> 1). We time, from the load step, the scale
decision (spec.replicas written) and, for the step up, the Deployment at its new size.

Two configurations run side by side in one run:
- ``inference``: the settings our docs recommend for GPU inference (5 s interval, 60 s
  scale-down window);
- ``HPA defaults``: the HorizontalPodAutoscaler's algorithm at its defaults (15 s sync
  period, 300 s scale-down stabilisation, no up-window), run by the same engine. A real
  HPA would add the Prometheus Adapter's query lag on top; it cannot run here (it needs an
  aggregated API server), so this baseline is the HPA's behaviour without that lag.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from environment import cluster_and_triton  # noqa: E402
from report import markers, percentile, write_section  # noqa: E402

from autoscaling_support import Load  # noqa: E402
from localcluster import Cluster  # noqa: E402
from localcluster.operator import OperatorProcess, free_port  # noqa: E402
from prometheus_support import start_prometheus  # noqa: E402
from support import get  # noqa: E402
from triton_support import start_sidecar, stop  # noqa: E402

BEGIN, END = markers("autoscale-bench")
CLIENTS, TARGET = 8, 2
CONFIGS: dict[str, dict[str, Any]] = {
    "inference": {"interval": "5s", "behavior": {"scaleDownStabilization": "60s"}},
    "HPA defaults": {"interval": "15s", "behavior": {"scaleDownStabilization": "300s"}},
}


def poll(probe: Callable[[], int], until: Callable[[int], bool], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not until(probe()):
        if time.monotonic() > deadline:
            raise TimeoutError("no reaction in time")
        time.sleep(0.1)
    return time.monotonic()


def replicas(cluster: Cluster, namespace: str, kind: str, name: str) -> int:
    found = get(cluster, namespace, kind, name)
    return 0 if found is None else int(found["spec"].get("replicas", 0))


def measure(
    cluster: Cluster, work: Path, label: str, config: dict[str, Any], triton: Any, steps: int
) -> dict[str, list[float]]:
    slug = label.lower().replace(" ", "-")
    namespace = f"bench-autoscale-{slug}-{int(time.time())}"
    cluster.kubectl("create", "namespace", namespace)
    procs, sidecars = [], []
    for i in range(2):
        proc, sidecar = start_sidecar(
            triton,
            work / f"{slug}-sidecar-{i}.log",
            (free_port(), free_port(), free_port()),
            model="slow",
        )
        procs.append(proc)
        sidecars.append(sidecar)
    port = free_port()
    (work / f"prom-{slug}").mkdir()
    prometheus = start_prometheus(
        work / f"prom-{slug}",
        port,
        {"pods": [s.metrics for s in sidecars]},
        target_labels={"pods": {"namespace": namespace, "modeldeployment": "resnet50"}},
    )
    operator = OperatorProcess(
        cluster, work / f"operator-{slug}.log", extra_args=(f"--namespace={namespace}",)
    )
    results: dict[str, list[float]] = {"up decision": [], "up applied": [], "down decision": []}
    high = -(-CLIENTS // TARGET)
    try:
        operator.start()
        doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())
        del doc["spec"]["resources"]
        doc["spec"]["autoscaling"] = {
            "minReplicas": 1,
            "maxReplicas": 8,
            "metrics": [{"type": "InFlightPerReplica", "target": TARGET}],
            "prometheus": {"url": f"http://127.0.0.1:{port}"},
            **config,
        }
        cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(doc))
        md = ("md", "resnet50")
        deployment = ("deployment", "resnet50-stable")
        poll(lambda: replicas(cluster, namespace, *deployment), lambda n: n == 1, 60)
        for step in range(steps):
            load = Load(sidecars, CLIENTS)
            decided = poll(lambda: replicas(cluster, namespace, *md), lambda n: n > 1, 120)
            applied = poll(
                lambda: replicas(cluster, namespace, *deployment), lambda n: n == high, 60
            )
            results["up decision"].append(decided - load.started)
            results["up applied"].append(applied - load.started)
            time.sleep(5)
            stopped = load.stop()
            lowered = poll(lambda: replicas(cluster, namespace, *md), lambda n: n < high, 600)
            results["down decision"].append(lowered - stopped)
            poll(lambda: replicas(cluster, namespace, *md), lambda n: n == 1, 600)
            print(
                f"[bench] {label} step {step + 1}: up {decided - load.started:.1f}s,"
                f" down {lowered - stopped:.1f}s",
                flush=True,
            )
        return results
    finally:
        operator.stop()
        prometheus.terminate()
        prometheus.wait(timeout=20)
        for proc in procs:
            stop(proc)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def render(results: dict[str, dict[str, list[float]]], date: str) -> str:
    rows = [
        BEGIN,
        f"Measured {date}: builtin engine, InFlightPerReplica target {TARGET}, a step from 0 to"
        f" {CLIENTS} requests in flight (1 -> {-(-CLIENTS // TARGET)} replicas) and back;"
        " Prometheus scraping the sidecars every 1 s. Seconds from the load step; p50 / max"
        " over the steps. `HPA defaults` is the HPA algorithm at its defaults (15 s sync,"
        " 300 s scale-down window) in the same engine; a real HPA adds the Prometheus"
        " Adapter's lag.",
        "",
        "| configuration | steps | step up: decision | step up: pods at size"
        " | step down: decision | down / HPA defaults |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    baseline = results.get("HPA defaults", {}).get("down decision")
    for label, found in results.items():

        def cell(key: str, found: dict[str, list[float]] = found) -> str:
            values = found[key]
            return f"{percentile(values, 0.5):.1f} / {max(values):.1f}"

        ratio = (
            f"{percentile(found['down decision'], 0.5) / percentile(baseline, 0.5):.2f}"
            if baseline
            else "-"
        )
        rows.append(
            f"| {label} ({CONFIGS[label]['interval']} interval,"
            f" {CONFIGS[label]['behavior']['scaleDownStabilization']} down window)"
            f" | {len(found['up decision'])} | {cell('up decision')} | {cell('up applied')}"
            f" | {cell('down decision')} | {ratio} |"
        )
    rows.append(END)
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="load steps per configuration")
    parser.add_argument("--baseline-steps", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    results = {}
    with cluster_and_triton("autoscale-bench-") as env:
        for label, config in CONFIGS.items():
            steps = args.baseline_steps if label == "HPA defaults" else args.steps
            print(f"[bench] {label}: {steps} steps", flush=True)
            results[label] = measure(env.cluster, env.work, label, config, env.triton, steps)
    section = render(results, dt.date.today().isoformat())
    print(section)
    write_section(args.output, "autoscale-bench", "Autoscaling reaction", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
