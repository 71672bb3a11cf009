"""Small helpers shared by the test modules."""

from __future__ import annotations

import copy
import datetime
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from localcluster import Cluster
from localcluster.operator import OperatorProcess

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DELETE = object()  # in a patch for merged(): remove the key

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 60.0) -> T:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.25)


def load_example(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return loaded


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` deep-merged in; ``DELETE`` values remove keys."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def cpu_model(name: str) -> dict[str, Any]:
    """minimal.yaml without a GPU, named ``name``: it runs on any simulated node."""
    manifest = merged(load_example("minimal.yaml"), {"spec": {"resources": {"gpu": DELETE}}})
    manifest["metadata"] = {"name": name}
    return manifest


def every_kind_of_child() -> dict[str, dict[str, Any]]:
    """ModelDeployments (by name) that between them have every kind of child the operator
    makes: Deployments and Services, an HPA, a KEDA ScaledObject, and an HTTPRoute with its
    track Services (the Gateway API and KEDA CRDs must be installed)."""
    metrics = [{"type": "InFlightPerReplica", "target": 4}]
    prometheus = {"url": "http://prometheus.monitoring:9090"}
    steps = [{"weight": 50, "pause": "manual"}, {"weight": 100}]
    gateway = {"parentRefs": [{"name": "inference-gateway"}], "hostnames": ["models.example.com"]}
    autoscaling = {"minReplicas": 1, "maxReplicas": 3, "metrics": metrics}
    specs: dict[str, dict[str, Any]] = {
        "hpa": {"autoscaling": {"engine": "hpa", **autoscaling}},
        "keda": {"autoscaling": {"engine": "keda", "prometheus": prometheus, **autoscaling}},
        "routed": {
            "rollout": {
                "strategy": "Canary",
                "steps": steps,
                "trafficRouting": {"gatewayAPI": gateway},
            }
        },
    }
    return {name: merged(cpu_model(name), {"spec": spec}) for name, spec in specs.items()}


def make(target: str, state_dir: Path, name: str) -> subprocess.CompletedProcess[str]:
    """`make <target>`, as a user runs it, against a private cluster state folder."""
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT),
            target,
            f"CLUSTER_DIR={state_dir}",
            f"CLUSTER_NAME={name}",
            f"PYTHON={sys.executable}",
            "REAL_NODE=0",  # the real node is the session cluster's (one per machine)
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    """One object as JSON, or None when it does not exist."""
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    """The condition of ``type_`` in an object's status, if it has one."""
    for found in (obj or {}).get("status", {}).get("conditions", []):
        if found["type"] == type_:
            return dict(found)
    return None


@contextmanager
def local_server(handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """A TCP server on 127.0.0.1 that hands each connection to ``handle`` in a thread of its
    own; yields its ``http://`` URL. Connections ``handle`` keeps open are its to close; the
    listener stops when the block ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


def token_kubeconfig(cluster: Cluster, token: str, path: Path) -> Path:
    """A kubeconfig for the local cluster that authenticates with ``token`` (a
    ServiceAccount's, from `kubectl create token`), not the admin's certificate."""
    admin = yaml.safe_load(cluster.state.kubeconfig.read_text())
    server = admin["clusters"][0]["cluster"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": server}],
                "users": [{"name": "modeldeploy", "user": {"token": token}}],
                "contexts": [
                    {"name": "operator", "context": {"cluster": "local", "user": "modeldeploy"}}
                ],
                "current-context": "operator",
            }
        )
    )
    return path


def start_scoped_operator(
    started: list[OperatorProcess],
    cluster: Cluster,
    namespace: str,
    log: Path,
    *args: str,
    resync_seconds: float = 3.0,
    kubeconfig: Path | None = None,
) -> OperatorProcess:
    """An operator of the test's own (``own_operator``'s list stops it) that watches only
    ``namespace`` and keeps its Lease there; ``args`` are more flags."""
    process = OperatorProcess(
        cluster,
        log,
        kubeconfig=kubeconfig,
        resync_seconds=resync_seconds,
        extra_args=(f"--namespace={namespace}", f"--leader-election-namespace={namespace}", *args),
    )
    started.append(process)
    process.start()
    return process


AUDIT_READS = ("get", "list", "watch")  # the audit log has lists and watches of ModelDeployments


def writes_by_operators(
    cluster: Cluster, since: datetime.datetime | None = None
) -> list[tuple[datetime.datetime, str, str]]:
    """Every write the API server's audit log records from an operator replica (its
    User-Agent is ``modeldeploy-operator/<version> (<identity>)``), received at or after
    ``since``: (received, identity, "VERB /uri code"), in order."""
    found = []
    for event in cluster.audit_events():
        named = re.fullmatch(r"modeldeploy-operator/\S+ \((.+)\)", event.get("userAgent", ""))
        if named is None or event["verb"] in AUDIT_READS:
            continue
        received = datetime.datetime.fromisoformat(event["requestReceivedTimestamp"])
        if since is None or received >= since:
            code = event.get("responseStatus", {}).get("code")
            what = f"{event['verb']} {event['requestURI']} {code}"
            found.append((received, named.group(1), what))
    return sorted(found)
