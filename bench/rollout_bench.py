"""`make bench-rollout`: time from a canary's first bad request to 0 % canary traffic.

The same machinery as the end-to-end analysis test: the local cluster and the operator (with
its default 30 s resync, so only the rollout's own timing counts), a real Triton, a stable and
a canary sidecar as the pods' sidecars, and a real Prometheus scraping them (1 s scrapes). The
canary's traffic fails every request; the analysis checks ErrorRatio with failureLimit 1. We
measure from the first bad request to the canary Deployment's deletion, for analysis intervals
of 5 s and 30 s, next to Flagger's and Argo Rollouts' documented defaults.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from environment import cluster_and_triton  # noqa: E402
from report import markers, write_section  # noqa: E402

from localcluster import Cluster  # noqa: E402
from localcluster.operator import OperatorProcess, free_port  # noqa: E402
from prometheus_support import start_prometheus  # noqa: E402
from rollout_support import canary_exists, start_canary  # noqa: E402
from triton_support import Traffic, json_body, start_sidecar, stop  # noqa: E402

BEGIN, END = markers("rollout-bench")
GOOD = json_body(np.zeros((1, 4), np.float32))
BAD = json_body(np.zeros((1, 3), np.float32))  # the model wants 4 values: every request fails


def wait(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("not done in time")
        time.sleep(0.1)


def measure(cluster: Cluster, work: Path, interval: int, triton: Any) -> float:
    namespace = f"bench-rollout-{interval}s-{int(time.time())}"
    cluster.kubectl("create", "namespace", namespace)
    stable_proc, stable = start_sidecar(
        triton,
        work / f"stable-{interval}.log",
        (free_port(), free_port(), free_port()),
        model="features",
    )
    canary_proc, canary = start_sidecar(
        triton,
        work / f"canary-{interval}.log",
        (free_port(), free_port(), free_port()),
        model="features",
        track="canary",
    )
    port = free_port()
    (work / f"prom-{interval}").mkdir()
    prometheus = start_prometheus(
        work / f"prom-{interval}",
        port,
        {"pods": [stable.metrics, canary.metrics]},
        target_labels={"pods": {"namespace": namespace, "modeldeployment": "resnet50"}},
    )
    operator = OperatorProcess(
        cluster,
        work / f"operator-{interval}.log",
        resync_seconds=30,
        extra_args=(f"--namespace={namespace}",),
    )
    traffic = [Traffic(stable, "features", lambda: GOOD)]
    try:
        operator.start()
        doc: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())
        del doc["spec"]["resources"]
        doc["spec"]["replicas"] = 2
        doc["spec"]["rollout"] = {
            "strategy": "Canary",
            "steps": [{"weight": 50, "pause": "1h"}, {"weight": 100}],
            "analysis": {
                "interval": f"{interval}s",
                "failureLimit": 1,
                "prometheus": {"url": f"http://127.0.0.1:{port}"},
                "metrics": [{"name": "errors", "builtin": "ErrorRatio", "max": 0.01}],
            },
        }
        start_canary(cluster, namespace, doc)
        wait(lambda: canary_exists(cluster, namespace), 30)
        bad = Traffic(canary, "features", lambda: BAD)
        traffic.append(bad)
        wait(lambda: not canary_exists(cluster, namespace), 10 * interval + 60)
        assert bad.first is not None
        return time.monotonic() - bad.first
    finally:
        for t in traffic:
            t.stop()
        operator.stop()
        prometheus.terminate()
        prometheus.wait(timeout=20)
        stop(stable_proc)
        stop(canary_proc)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def render(results: dict[int, float], date: str) -> str:
    rows = [
        BEGIN,
        f"Measured {date}: fault (the canary's first failing request) to 0 % canary traffic"
        " (canary Deployment deleted), ErrorRatio analysis with failureLimit 1, Prometheus"
        " scraping every 1 s, the operator's resync at its default 30 s.",
        "",
        "| system | analysis interval | fault to 0 % canary |",
        "| --- | --- | --- |",
    ]
    rows += [f"| modeldeploy | {i} s | {seconds:.1f} s |" for i, seconds in results.items()]
    rows += [
        "| Flagger (documented default) | `interval: 1m` (default 60 s), rollback after `threshold`"
        " failed checks (5 in its examples) | ~5 min (10 min with the issue's cited example) |",
        "| Argo Rollouts (documented AnalysisTemplate example) | `interval: 5m`, `failureLimit: 3`"
        " (fails on the 4th failed measurement) | ~15-20 min |",
        END,
    ]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", type=int, nargs="+", default=[5, 30])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    results = {}
    with cluster_and_triton("rollout-bench-") as env:
        for interval in args.intervals:
            print(f"[bench] analysis interval {interval}s", flush=True)
            results[interval] = measure(env.cluster, env.work, interval, env.triton)
            print(f"[bench]   fault to 0 %: {results[interval]:.1f}s", flush=True)
    section = render(results, dt.date.today().isoformat())
    print(section)
    write_section(args.output, "rollout-bench", "Canary rollback", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
