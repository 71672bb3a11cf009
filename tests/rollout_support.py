"""Helpers for canary rollout tests and the rollout benchmark (one ModelDeployment,
``resnet50``, per namespace)."""

from __future__ import annotations

import json
from typing import Any

import yaml

from localcluster import Cluster
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
