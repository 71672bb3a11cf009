"""`make soak`: many ModelDeployments under random faults for a set time, then invariants.

On the local control plane (simulated nodes with room for every pod), an operator process
reconciles ``--models`` ModelDeployments (500) while, every ``--fault-every`` seconds, the
soak injects one fault, chosen at random (seeded):

- a spec change: replicas, or a new model version (a canary with a timed step; one in ten
  ModelDeployments is judged by an analysis against a real Prometheus);
- a manual command: abort, pause then resume, or promote (never on a judged canary);
- the operator SIGKILLed, and started again at once (a kubelet would);
- the kube-apiserver SIGKILLed and started again;
- Prometheus stopped for 20 s.

After ``--seconds`` the faults stop and the invariants are checked:

1. every ModelDeployment converges (observedGeneration, no canary left, its stable
   Deployment at its replicas and version, or the revision held after an abort), and the
   time that takes after the last fault is measured;
2. nothing is lost or orphaned: every ModelDeployment has its Deployment and Service,
   every child its owner;
3. no judged revision is promoted while Prometheus is down;
4. Events stay bounded per ModelDeployment.

The figures go to docs/benchmarks.md; the exit status is 1 on any violation.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from report import markers, write_section  # noqa: E402

from localcluster import Cluster, ClusterState, Toolchain  # noqa: E402
from localcluster.nodes import NodeSpec, node_manifest  # noqa: E402
from localcluster.operator import OperatorProcess, free_port  # noqa: E402
from prometheus_support import start_prometheus  # noqa: E402
from support import DELETE, load_example, merged  # noqa: E402

BEGIN, END = markers("soak")
OUTAGE_SECONDS = 20.0
EVENTS_PER_MODEL = 60  # the bound: every transition of a busy soak fits well within it
ANALYSED_EVERY = 10  # one ModelDeployment in ten is judged by an analysis


@dataclass
class Soak:
    cluster: Cluster
    operator: OperatorProcess
    prometheus_url: str
    prometheus_start: Any  # () -> Popen
    rng: random.Random
    models: list[str]
    namespace: str
    versions: dict[str, int] = field(default_factory=dict)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    outages: list[tuple[dt.datetime, dt.datetime]] = field(default_factory=list)
    operator_restarts: int = 0
    prometheus: subprocess.Popen[bytes] | None = None
    prometheus_back_at: float | None = None
    paused: set[str] = field(default_factory=set)

    def outage(self) -> bool:
        return self.prometheus is None

    def analysed(self, name: str) -> bool:
        return int(name[1:]) % ANALYSED_EVERY == 0

    def manifest(self, name: str) -> dict[str, Any]:
        analysed = self.analysed(name)
        rollout: dict[str, Any] = {
            "strategy": "Canary",
            "steps": [{"weight": 50, "pause": "5s" if analysed else "2s"}, {"weight": 100}],
        }
        if analysed:
            rollout["analysis"] = {
                "interval": "5s",
                "prometheus": {"url": self.prometheus_url},
                "metrics": [{"name": "alive", "query": "vector(0)", "max": 1}],
            }
        spec = {
            "model": {"version": str(self.versions.get(name, 1))},
            "replicas": 1,
            "resources": {"gpu": DELETE},  # CPU pods, on the simulated nodes the soak adds
            "rollout": rollout,
        }
        manifest = merged(load_example("minimal.yaml"), {"spec": spec})
        manifest["metadata"] = {"name": name, "namespace": self.namespace}
        return manifest

    def kubectl(self, *args: str) -> None:
        self.cluster.kubectl(*args, check=False, timeout=60)

    # -- faults --------------------------------------------------------------------------

    def inject(self) -> None:
        kind = self.rng.choices(
            ["spec", "command", "kill-operator", "restart-apiserver", "prometheus-outage"],
            weights=[50, 20, 10, 10, 10],
        )[0]
        if kind == "prometheus-outage" and self.prometheus is None:
            kind = "spec"  # already down
        self.faults[kind] += 1
        name = self.rng.choice(self.models)
        if kind == "spec":
            patch: dict[str, Any]
            if self.rng.random() < 0.5:
                patch = {"spec": {"replicas": self.rng.randint(1, 2)}}
            else:
                self.versions[name] = self.versions.get(name, 1) + 1
                patch = {"spec": {"model": {"version": str(self.versions[name])}}}
            self.patch(name, patch)
        elif kind == "command":
            command = self.rng.choice(["abort", "pause", "promote"])
            if command == "promote" and self.analysed(name):
                command = "abort"  # a person promoting skips the analysis: not measured here
            self.command(name, command)
        elif kind == "kill-operator":
            pid = self.operator.pid
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            self.operator.stop()
            self.operator.start(timeout=60)
            self.operator_restarts += 1
        elif kind == "restart-apiserver":
            self.cluster.restart_component("kube-apiserver")
        else:
            assert self.prometheus is not None
            self.prometheus.terminate()
            self.prometheus.wait(timeout=30)
            self.prometheus = None
            self.prometheus_back_at = time.monotonic() + OUTAGE_SECONDS
            self.outages.append((now(), now()))

    def patch(self, name: str, patch: dict[str, Any]) -> None:
        body = json.dumps(patch)
        self.kubectl("patch", "md", name, "-n", self.namespace, "--type=merge", "-p", body)

    def command(self, name: str, command: str) -> None:
        annotation = f"serving.modeldeploy.io/command={command}"
        self.kubectl("annotate", "--overwrite", "md", name, "-n", self.namespace, annotation)
        if command == "pause":
            self.paused.add(name)

    def tend(self) -> None:
        """What a kubelet and the calendar do: an exited operator is started again, an
        outage ends."""
        if not self.operator.running:
            self.operator.stop()
            self.operator.start(timeout=60)
            self.operator_restarts += 1
        back_at = self.prometheus_back_at
        if self.prometheus is None and back_at is not None and time.monotonic() >= back_at:
            self.prometheus = self.prometheus_start()
            self.prometheus_back_at = None
            began, _ = self.outages[-1]
            self.outages[-1] = (began, now())


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def converged(md: dict[str, Any], deployments: dict[str, dict[str, Any]]) -> bool:
    meta, spec, status = md["metadata"], md["spec"], md.get("status") or {}
    if status.get("observedGeneration") != meta.get("generation") or status.get("canary"):
        return False
    stable = deployments.get(f"{meta['name']}-stable")
    if stable is None or stable["spec"].get("replicas") != spec["replicas"]:
        return False
    version = stable["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/version")
    held = bool(status.get("rollback"))  # aborted: the old version serves, the new is held
    return held or version == spec["model"]["version"]


def snapshot(
    cluster: Cluster, namespace: str
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    mds = cluster.kubectl_json("get", "md", "-n", namespace)["items"]
    listed = cluster.kubectl_json("get", "deployments", "-n", namespace)["items"]
    return mds, {d["metadata"]["name"]: d for d in listed}


def check(cluster: Cluster, soak: Soak) -> list[str]:
    """Invariants 2-4 (the first is the wait for convergence); each violation as text."""
    violations = []
    mds, deployments = snapshot(cluster, soak.namespace)
    names = {m["metadata"]["name"] for m in mds}
    if names != set(soak.models):
        violations.append(f"ModelDeployments lost: {sorted(set(soak.models) - names)[:5]}")
    services = {
        s["metadata"]["name"]: s
        for s in cluster.kubectl_json("get", "services", "-n", soak.namespace)["items"]
    }
    for name in names:
        if f"{name}-stable" not in deployments or name not in services:
            violations.append(f"{name}: its Deployment or Service is missing")
    for child in [*deployments.values(), *services.values()]:
        owners = [o["name"] for o in child["metadata"].get("ownerReferences", [])]
        if not owners or owners[0] not in names:
            violations.append(f"orphan: {child['kind']} {child['metadata']['name']}")
    for md in mds:
        name = md["metadata"]["name"]
        if not soak.analysed(name):
            continue
        for entry in (md.get("status") or {}).get("history", []):
            finished = dt.datetime.fromisoformat(entry["finished"])
            if entry["result"] == "Promoted" and any(a <= finished <= b for a, b in soak.outages):
                violations.append(f"{name}: version {entry['version']} promoted unjudged")
    events = cluster.kubectl_json("get", "events", "-n", soak.namespace)["items"]
    per_model: collections.Counter[str] = collections.Counter()
    for event in events:
        if event["involvedObject"].get("kind") == "ModelDeployment":
            per_model[event["involvedObject"]["name"]] += event.get("count", 1)
    busiest = per_model.most_common(1)
    if busiest and busiest[0][1] > EVENTS_PER_MODEL:
        violations.append(f"{busiest[0][0]}: {busiest[0][1]} Events")
    soak.faults["events-max-per-model"] = busiest[0][1] if busiest else 0
    return violations


def main() -> int:  # noqa: PLR0915 - one run, start to report
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1800.0, help="how long faults go on")
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--fault-every", type=float, default=5.0, help="seconds between faults")
    parser.add_argument("--settle", type=float, default=600.0, help="bound on convergence")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()

    cluster = Cluster(Toolchain.locate(), ClusterState.default(), real_node=None)
    started_here = cluster.up()
    work = cluster.state.root / "soak"
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()

    def prometheus() -> subprocess.Popen[bytes]:
        (work / "prometheus").mkdir(parents=True, exist_ok=True)
        return start_prometheus(work / "prometheus", port, {"self": [f"127.0.0.1:{port}"]})

    namespace = f"soak-{int(time.time())}"
    operator = OperatorProcess(
        cluster,
        work / "operator.log",
        resync_seconds=10.0,
        extra_args=(f"--namespace={namespace}", f"--leader-election-namespace={namespace}"),
    )
    soak = Soak(
        cluster,
        operator,
        f"http://127.0.0.1:{port}",
        prometheus,
        random.Random(args.seed),  # noqa: S311 - faults to inject, not secrets
        [f"m{i:03d}" for i in range(args.models)],
        namespace,
    )
    nodes = [
        NodeSpec(f"soak-cpu-{i}", cpu="512", memory="2048Gi", pods=1100)
        for i in range(max(1, -(-3 * args.models // 1000)))
    ]
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        cluster.wait_established(30)
        cluster.kubectl("create", "namespace", namespace, check=False)
        cluster.kubectl(
            "create",
            "-f",
            "-",
            stdin=yaml.safe_dump_all([node_manifest(n) for n in nodes]),
            check=False,
        )
        soak.prometheus = prometheus()
        operator.start(timeout=60)
        items = [soak.manifest(name) for name in soak.models]
        cluster.kubectl(
            "apply",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
            timeout=300,
        )
        print(f"[soak] {args.models} ModelDeployments; faults for {args.seconds:.0f} s", flush=True)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            soak.inject()
            pause_until = time.monotonic() + args.fault_every
            while time.monotonic() < pause_until:
                soak.tend()
                time.sleep(0.5)
        last_fault = time.monotonic()
        while soak.outage():  # the last outage ends as planned
            soak.tend()
            time.sleep(0.5)
        for name in sorted(soak.paused):
            soak.command(name, "resume")
        print(f"[soak] faults stopped: {dict(soak.faults)}; settling", flush=True)
        settled = None
        while time.monotonic() - last_fault < args.settle:
            soak.tend()
            mds, deployments = snapshot(cluster, soak.namespace)
            pending = [m["metadata"]["name"] for m in mds if not converged(m, deployments)]
            if not pending:
                settled = time.monotonic() - last_fault
                break
            time.sleep(2)
        violations = [] if settled is not None else [f"not converged: {pending[:10]}"]
        violations += check(cluster, soak)
    finally:
        operator.stop()
        if soak.prometheus is not None:
            soak.prometheus.terminate()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        for node in nodes:  # tests count the nodes and where pods land
            cluster.kubectl("delete", "node", node.name, "--wait=false", check=False)
        if started_here:
            cluster.down()

    injected = sum(v for k, v in soak.faults.items() if k != "events-max-per-model")
    lines = [
        BEGIN,
        f"Measured {now():%Y-%m-%d} by `make soak` (bench/soak.py): {args.models}"
        f" ModelDeployments, faults for {args.seconds:.0f} s, one every {args.fault_every:g} s"
        f" (seed {args.seed}).",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| faults injected | {injected} |",
        *(
            f"| {kind} | {count} |"
            for kind, count in sorted(soak.faults.items())
            if kind != "events-max-per-model"
        ),
        f"| operator restarts (kills, and exits after a lost Lease) | {soak.operator_restarts} |",
        "| convergence after the last fault | "
        + (f"{settled:.0f} s |" if settled is not None else f"not within {args.settle:.0f} s |"),
        f"| most Events for one ModelDeployment | {soak.faults['events-max-per-model']} |",
        f"| invariant violations | {len(violations)} |",
        END,
    ]
    section = "\n".join(lines) + "\n"
    write_section(args.output, "soak", "Soak", section)
    print(section)
    for violation in violations:
        print(f"[soak] VIOLATION {violation}", file=sys.stderr)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
