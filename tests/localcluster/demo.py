"""`make demo`: the main job on the local cluster, start to finish.

Starts the cluster, installs the CRD, runs the operator in the background (stopped by
`make cluster-down`), applies examples/minimal.yaml and shows it become Ready.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from localcluster.cluster import Cluster, is_ours, read_pid_files
from localcluster.operator import OperatorProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "minimal.yaml"
NAME = "resnet50"


def show(cluster: Cluster, out: TextIO, *args: str) -> None:
    print(f"\n$ kubectl {' '.join(args)}", file=out)
    print(cluster.kubectl(*args, timeout=120).stdout.rstrip(), file=out, flush=True)


def ensure_operator(cluster: Cluster, out: TextIO) -> None:
    running = [
        p for p in read_pid_files(cluster.state.root) if is_ours(p.pid, str(cluster.state.root))
    ]
    if running:
        print(f"[demo] the operator is already running (pid {running[0].pid})", file=out)
        return
    operator = OperatorProcess(
        cluster, cluster.state.root / "operator.log", resync_seconds=30.0, detach=True
    )
    operator.start()
    cluster.state.operator_pid_file.write_text(f"{operator.pid}\n")
    print(
        f"[demo] started the operator (pid {operator.pid}); logs: {operator.log_path},"
        f" metrics: http://127.0.0.1:{operator.metrics_port}/metrics",
        file=out,
    )


def run(cluster: Cluster, out: TextIO = sys.stdout) -> None:
    cluster.up()
    show(cluster, out, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=30s")
    ensure_operator(cluster, out)
    show(cluster, out, "apply", "-f", str(EXAMPLE.relative_to(ROOT)))
    show(cluster, out, "wait", "--for=condition=Ready", f"md/{NAME}", "--timeout=90s")
    show(cluster, out, "get", "md", "-o", "wide")
    show(
        cluster,
        out,
        "get",
        "deployments,services,pods",
        "-l",
        f"serving.modeldeploy.io/modeldeployment={NAME}",
        "-o",
        "wide",
    )
    show(
        cluster,
        out,
        "get",
        "events",
        "--field-selector",
        f"involvedObject.kind=ModelDeployment,involvedObject.name={NAME}",
    )
    print(
        "\nNext: `kubectl describe md resnet50`, `kubectl scale md resnet50 --replicas 3`,"
        " or edit examples/; `make cluster-down` stops everything.",
        file=out,
    )
