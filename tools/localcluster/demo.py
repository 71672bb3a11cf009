"""`make demo`: the main job on the local cluster, start to finish.

1. Starts the cluster with its real node (images built or taken from the cache), Prometheus
   discovering model pods, and the operator installed by the Helm chart as a pod.
2. Serves examples/iris.yaml from a model store on this machine, waits until it is Ready and
   sends a real inference through its Service.
3. Rolls version 2 out as a canary judged by the sidecar's metrics, showing
   `kubectl modeldeploy status` until it is promoted, then asks the new version.

It leaves everything running and prints how to use and stop it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any, TextIO

import yaml

from localcluster.cluster import Cluster, ClusterError, repo_root
from localcluster.dataplane import (
    ClusterPrometheus,
    first_answer,
    infer,
    install_operator,
    serve_model_store,
    service_address,
)
from localcluster.toolchain import format_duration

NAMESPACE = "demo"
NAME = "iris"
SAMPLES = {
    "setosa-like": [5.1, 3.5, 1.4, 0.2],
    "versicolor-like": [6.0, 2.9, 4.5, 1.5],
    "virginica-like": [6.9, 3.1, 5.4, 2.1],
}
CLASSES = ("setosa", "versicolor", "virginica")
ROLLOUT_TIMEOUT_SECONDS = 300.0


def example() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((repo_root() / "examples" / "iris.yaml").read_text())
    return loaded


def show(cluster: Cluster, out: TextIO, *args: str) -> str:
    print(f"\n$ kubectl {' '.join(args)}", file=out)
    text = cluster.kubectl(*args, timeout=320).stdout.rstrip()
    print(text, file=out, flush=True)
    return text


def print_answer(out: TextIO, address: str, answer: list[list[float]]) -> None:
    print(f"\n[demo] POST http://{address}/v2/models/{NAME}/infer answered:", file=out)
    for (label, features), probabilities in zip(SAMPLES.items(), answer, strict=True):
        best = CLASSES[max(range(3), key=lambda i: probabilities[i])]
        shown = ", ".join(f"{c} {p:.3f}" for c, p in zip(CLASSES, probabilities, strict=True))
        print(f"  {label:16} {features} -> {best:10} ({shown})", file=out, flush=True)


def new_answer(address: str, old: list[list[float]], timeout: float = 60.0) -> list[list[float]]:
    """The first answer that differs from ``old``: promotion replaces the pods, and the old
    version's may answer for a few more seconds."""
    deadline = time.monotonic() + timeout
    while True:
        answer = first_answer(address, NAME, list(SAMPLES.values()))
        if answer != old or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def plugin_status(cluster: Cluster) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeldeploy_operator.plugin",
            "status",
            NAME,
            "-n",
            NAMESPACE,
            f"--kubeconfig={cluster.state.kubeconfig}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return (result.stdout or result.stderr).rstrip()


def status_of(cluster: Cluster) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        cluster.kubectl("get", "md", NAME, "-n", NAMESPACE, "-o", "json").stdout
    )
    status: dict[str, Any] = body.get("status", {})
    return status


def roll_out_version_2(cluster: Cluster, out: TextIO, address: str) -> None:
    before = len(status_of(cluster).get("history") or [])
    patch = {"spec": {"model": {"version": "2", "storageUri": "pvc://model-store/iris/2"}}}
    show(
        cluster, out, "patch", "md", NAME, "-n", NAMESPACE, "--type=merge", "-p", json.dumps(patch)
    )
    deadline = time.monotonic() + ROLLOUT_TIMEOUT_SECONDS
    last = ""
    said_promoted = False
    while True:
        # Clients keep asking during the rollout: that is what the analysis judges.
        try:
            infer(address, NAME, list(SAMPLES.values()))
        except Exception as error:  # shown; the rollout goes on
            print(f"[demo] an inference failed during the rollout: {error}", file=out)
        text = plugin_status(cluster)
        if text != last:
            print(f"\n$ kubectl modeldeploy status {NAME} -n {NAMESPACE}\n{text}", file=out)
            last = text
        status = status_of(cluster)
        ended = (status.get("history") or [])[before:]
        promoted = status.get("stable", {}).get("version") == "2" and not status.get("canary")
        if promoted and not said_promoted:
            print("\n[demo] version 2 was promoted", file=out, flush=True)
            said_promoted = True
        # Done when the promoted version serves at full size (promotion replaces the pods).
        if promoted and status.get("phase") == "Available":
            return
        if any(entry.get("result") not in (None, "Promoted") for entry in ended):
            raise ClusterError(f"the canary of version 2 ended as {ended[-1]}")
        if time.monotonic() > deadline:
            raise ClusterError(f"version 2 was not promoted in {ROLLOUT_TIMEOUT_SECONDS:.0f}s")
        time.sleep(0.5)


def run(cluster: Cluster, out: TextIO = sys.stdout) -> None:
    started = time.monotonic()
    cluster.up()
    prometheus = ClusterPrometheus(cluster).ensure_started()
    print(f"[demo] Prometheus discovers model pods at {prometheus}", file=out, flush=True)
    show(
        cluster, out, "apply", "--server-side", "--force-conflicts", "-f", str(repo_root() / "crds")
    )
    cluster.wait_established(30)
    install_operator(cluster, prometheus_url=prometheus)
    show(cluster, out, "get", "pods", "-n", "modeldeploy-system", "-o", "wide")

    # A second run starts the story over: version 1 first.
    cluster.kubectl("delete", "md", NAME, "-n", NAMESPACE, "--ignore-not-found", timeout=120)
    cluster.kubectl("create", "namespace", NAMESPACE, check=False)
    serve_model_store(cluster, NAMESPACE, [repo_root() / "examples" / "models"])
    manifest = example()
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin=json.dumps(manifest))
    print(f"\n$ kubectl apply -n {NAMESPACE} -f examples/iris.yaml", file=out)
    applied = time.monotonic()
    show(
        cluster,
        out,
        "wait",
        "--for=condition=Ready",
        f"md/{NAME}",
        "-n",
        NAMESPACE,
        "--timeout=300s",
    )
    print(f"[demo] Ready {format_duration(time.monotonic() - applied)} after apply", file=out)
    show(cluster, out, "get", "md", "-n", NAMESPACE, "-o", "wide")
    show(cluster, out, "get", "pods", "-n", NAMESPACE, "-o", "wide")

    address = service_address(cluster, NAMESPACE, NAME)
    version_1 = first_answer(address, NAME, list(SAMPLES.values()))
    print_answer(out, address, version_1)

    roll_out_version_2(cluster, out, address)
    print_answer(out, address, new_answer(address, version_1))
    show(
        cluster,
        out,
        "get",
        "events",
        "-n",
        NAMESPACE,
        "--field-selector",
        f"involvedObject.name={NAME}",
    )
    print(
        f"\n[demo] done in {format_duration(time.monotonic() - started)}. Everything is still"
        f" running:\n"
        f"  kubectl modeldeploy status {NAME} -n {NAMESPACE}\n"
        f"  kubectl logs -n {NAMESPACE} deploy/{NAME}-stable -c triton\n"
        f"  Prometheus: {prometheus}\n"
        "  make cluster-down stops everything.",
        file=out,
        flush=True,
    )
