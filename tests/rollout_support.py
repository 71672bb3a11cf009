"""Helpers for canary rollout tests and the rollout benchmark (one ModelDeployment,
``resnet50``, per namespace)."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

import yaml

from localcluster import Cluster
from modeldeploy_operator.api.v1alpha1 import API_VERSION, KIND
from modeldeploy_operator.k8s.client import KubernetesApi, load_api_client
from support import DELETE, load_example, merged, wait_for

NAME = "resnet50"


def md_status(cluster: Cluster, namespace: str) -> dict[str, Any]:
    """The ModelDeployment's status ({} while it does not exist)."""
    result = cluster.kubectl("get", "md", NAME, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        return {}
    found: dict[str, Any] = json.loads(result.stdout).get("status", {})
    return found


def canary_exists(cluster: Cluster, namespace: str) -> bool:
    command = ("get", "deployment", f"{NAME}-canary", "-n", namespace)
    return cluster.kubectl(*command, check=False).returncode == 0


def set_version(cluster: Cluster, namespace: str, version: str) -> None:
    patch = json.dumps({"spec": {"model": {"version": version}}})
    cluster.kubectl("patch", "md", NAME, "-n", namespace, "--type=merge", "-p", patch)


def start_canary(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> None:
    """Apply version 1, wait until it is Available, then apply version 2: a canary starts."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))
    wait_for(
        "version 1 Available", lambda: md_status(cluster, namespace).get("phase") == "Available"
    )
    set_version(cluster, namespace, "2")


def manual_canary(**rollout: Any) -> dict[str, Any]:
    """minimal.yaml on CPU with 2 replicas and a Canary rollout that waits at 50 % for a
    user (``pause: manual``), then goes to 100 %; ``rollout`` adds to ``spec.rollout``."""
    steps = [{"weight": 50, "pause": "manual"}, {"weight": 100}]
    spec = {
        "replicas": 2,
        "resources": {"gpu": DELETE},
        "rollout": {"strategy": "Canary", "steps": steps, **rollout},
    }
    return merged(load_example("minimal.yaml"), {"spec": spec})


class StatusRecorder:
    """Watches the namespace's ModelDeployments (or ``kind``) in a thread and keeps every
    version the API server sends (each write is an event, so no transition can fall between
    two looks): (monotonic time, generation, status) of ``name`` in ``seen``, and the
    objects in ``objects``."""

    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        kind: tuple[str, str] = (API_VERSION, KIND),
        name: str = NAME,
    ) -> None:
        self.seen: list[tuple[float, int, dict[str, Any]]] = []
        self.objects: list[dict[str, Any]] = []
        api = KubernetesApi(load_api_client(str(cluster.state.kubeconfig)))
        self._stop = threading.Event()
        api_version, kind_name = kind
        _, version = api.list_all(api_version, kind_name, namespace)

        def run() -> None:
            nonlocal version
            while not self._stop.is_set():
                events = api.watch(
                    api_version,
                    kind_name,
                    namespace,
                    selector="",
                    resource_version=version,
                    timeout_seconds=5,
                    inactivity_seconds=70,
                )
                for event in events:
                    obj, meta = event["object"], event["object"].get("metadata") or {}
                    version = meta.get("resourceVersion") or version  # bookmarks too
                    if event["type"] in ("ADDED", "MODIFIED") and meta.get("name") == name:
                        generation = int(meta.get("generation", 0))
                        self.seen.append((time.monotonic(), generation, obj.get("status", {})))
                        self.objects.append(obj)
                    if self._stop.is_set():
                        return

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)  # the watch ends within its 5 s

    def conditions(self, type_: str) -> list[tuple[str, str, str | None]]:
        """(status, reason, lastTransitionTime) of one condition, as it changed."""
        found: list[tuple[str, str, str | None]] = []
        for _, _, status in self.seen:
            for c in status.get("conditions", []):
                entry = (c["status"], c["reason"], c.get("lastTransitionTime"))
                if c["type"] == type_ and (not found or found[-1] != entry):
                    found.append(entry)
        return found

    def violations(self, within: float = 5.0) -> list[str]:
        """What breaks the API conventions: a lastTransitionTime that moved without its
        condition's status changing, a reason that is not CamelCase, a generation that
        observedGeneration took longer than ``within`` seconds to reach."""
        problems: list[str] = []
        last: dict[str, tuple[str, str | None]] = {}
        since: dict[int, float] = {}
        for at, generation, status in self.seen:
            since.setdefault(generation, at)
            if status.get("observedGeneration") == generation:
                if at - since[generation] > within:
                    problems.append(
                        f"generation {generation} observed after {at - since[generation]:.1f} s"
                    )
                since[generation] = float("inf")  # reached: measured once
            for c in status.get("conditions", []):
                if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", c["reason"]):
                    problems.append(f"{c['type']} reason {c['reason']!r} is not CamelCase")
                before = last.get(c["type"])
                moved = before is not None and before[1] != c.get("lastTransitionTime")
                if moved and before is not None and before[0] == c["status"]:
                    problems.append(f"{c['type']} lastTransitionTime moved while {c['status']}")
                last[c["type"]] = (c["status"], c.get("lastTransitionTime"))
        return sorted(set(problems))
