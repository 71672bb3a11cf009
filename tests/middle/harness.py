"""The middle tier's wiring: one ModelDeployment driven through the real ``Reconciler`` and
``reconcile()`` against :mod:`middle.fakes`, one simulated step at a time.

A step is: the Deployment controller and kubelet act (pods made, Ready, removed), the
invariants registered with :meth:`Harness.watch` are checked, the fake clock moves on, and
the operator reconciles (as a watch event on a pod or child would make it do).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from middle.fakes import DeploymentController, FakeClock, FakeKubeApi, Json, ScriptedMetrics
from modeldeploy_operator.builders.deployment import BuildConfig
from modeldeploy_operator.context import GpuInventory, OperatorContext
from modeldeploy_operator.reconcile import Outcome, Reconciler
from modeldeploy_operator.telemetry import Telemetry
from support import load_example, merged

NAMESPACE = "ns"
NAME = "iris"
MD_API_VERSION = "serving.modeldeploy.io/v1alpha1"
KIND = "ModelDeployment"
COMMAND = "serving.modeldeploy.io/command"
MD_LABEL = "serving.modeldeploy.io/modeldeployment"
TRACK_LABEL = "serving.modeldeploy.io/track"
PROMETHEUS = "http://prometheus.middle.test:9090"


def model(
    replicas: int = 2,
    steps: list[dict[str, Any]] | None = None,
    interval: str = "10s",
    failure_limit: int = 2,
    **spec: Any,
) -> Json:
    """``examples/iris.yaml`` in namespace ``ns``: one NVIDIA-L4 GPU per pod, a surge of one
    pod, a canary judged every ``interval`` on one metric (errors, at most 0.01)."""
    return merged(
        load_example("iris.yaml"),
        {
            "metadata": {"namespace": NAMESPACE},
            "spec": {
                "replicas": replicas,
                "rollout": {
                    "strategy": "Canary",
                    "steps": steps or [{"weight": 50, "pause": "20s"}, {"weight": 100}],
                    "analysis": {
                        "interval": interval,
                        "failureLimit": failure_limit,
                        "metrics": [{"name": "errors", "builtin": "ErrorRatio", "max": 0.01}],
                    },
                },
                **spec,
            },
        },
    )


def operator_context(
    api: FakeKubeApi, clock: FakeClock, metrics: ScriptedMetrics
) -> OperatorContext:
    """What ``__main__`` builds at start-up, with the fakes in place of the clients."""
    return OperatorContext(
        api=api,
        build=BuildConfig(runtime_image="ghcr.io/modeldeploy/runtime:middle"),
        telemetry=Telemetry(),
        gpus=GpuInventory(api, clock=clock.epoch),
        logger=logging.getLogger("modeldeploy.middle"),
        clock=clock.iso,
        epoch=clock.epoch,
        metrics_provider=metrics,
        prometheus_url=PROMETHEUS,
    )


@dataclass
class Harness:
    api: FakeKubeApi
    clock: FakeClock
    metrics: ScriptedMetrics
    controller: DeploymentController
    ctx: OperatorContext
    reconciler: Reconciler
    seconds_per_step: float = 5.0
    invariants: list[Callable[[Harness], None]] = field(default_factory=list)
    outcomes: list[Outcome | None] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        doc: Json,
        ready_after: Callable[[Json], int] = lambda pod: 2,
        crashing: Callable[[Json], bool] = lambda pod: False,
    ) -> Harness:
        api = FakeKubeApi()
        clock = FakeClock()
        metrics = ScriptedMetrics(clock)
        ctx = operator_context(api, clock, metrics)
        api.create(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": "gpu-0",
                    "labels": {
                        "nvidia.com/gpu.present": "true",
                        "nvidia.com/gpu.product": "NVIDIA-L4",
                    },
                },
                "status": {"allocatable": {"nvidia.com/gpu": "8"}},
            }
        )
        api.create(doc)
        controller = DeploymentController(api, ready_after=ready_after, crashing=crashing)
        return cls(api, clock, metrics, controller, ctx, Reconciler(ctx))

    # -- reading --------------------------------------------------------------------------------

    def md(self) -> Json:
        found = self.api.peek(MD_API_VERSION, KIND, NAMESPACE, NAME)
        assert found is not None
        return found

    def status(self) -> Json:
        status: Json = self.md().get("status") or {}
        return status

    def condition(self, type_: str) -> Json:
        return next((c for c in self.status().get("conditions", []) if c["type"] == type_), {})

    def deployment(self, track: str) -> Json | None:
        return self.api.peek("apps/v1", "Deployment", NAMESPACE, f"{NAME}-{track}")

    def pods(self, track: str | None = None) -> list[Json]:
        selector = f"{MD_LABEL}={NAME}" + (f",{TRACK_LABEL}={track}" if track else "")
        return self.api.items("Pod", NAMESPACE, selector)

    def ready_pods(self, track: str | None = None) -> int:
        return sum(
            1
            for p in self.pods(track)
            if any(
                c["type"] == "Ready" and c["status"] == "True" for c in p["status"]["conditions"]
            )
        )

    def stable_version(self) -> str | None:
        stable = self.status().get("stable") or {}
        return stable.get("version")

    def promoted(self) -> bool:
        return any(h.get("result") == "Promoted" for h in self.status().get("history", []))

    # -- acting -------------------------------------------------------------------------------

    def watch(self, invariant: Callable[[Harness], None]) -> None:
        """Check ``invariant`` after every step of the controllers (and now)."""
        self.invariants.append(invariant)
        invariant(self)

    def reconcile(self) -> Outcome | None:
        outcome = self.reconciler.handle((NAMESPACE, NAME))  # one pass, as a worker runs it
        self.outcomes.append(outcome)
        return outcome

    def restart_operator(self) -> None:
        """A new operator process: a fresh context and queue, nothing remembered."""
        self.ctx = operator_context(self.api, self.clock, self.metrics)
        self.reconciler = Reconciler(self.ctx)

    def step(self) -> None:
        self.controller.step()
        for invariant in self.invariants:
            invariant(self)
        self.clock.advance(self.seconds_per_step)
        self.reconcile()

    def run(self, what: str, until: Callable[[], bool], limit: int = 100) -> int:
        """Step until ``until()``; fail after ``limit`` steps. Returns the steps taken."""
        for taken in range(limit + 1):
            if until():
                return taken
            self.step()
        pytest.fail(f"no {what} after {limit} steps: status {self.status()}")

    def steps(self, count: int) -> None:
        for _ in range(count):
            self.step()

    def bring_up(self) -> None:
        """Version 1 rolled out and Available: ``status.stable`` records it."""
        self.reconcile()
        self.run(
            "version 1 Available",
            lambda: self.status().get("phase") == "Available" and self.stable_version() == "1",
        )

    def set_version(self, version: str) -> None:
        """A user changes the model version (and where it is stored): a new revision."""
        patch = {"spec": {"model": {"version": version, "storageUri": f"pvc://store/{version}"}}}
        self.api.edit(MD_API_VERSION, KIND, NAMESPACE, NAME, patch)

    def command(self, command: str) -> None:
        """``kubectl modeldeploy <command>``: the annotation the operator consumes."""
        patch = {"metadata": {"annotations": {COMMAND: command}}}
        self.api.edit(MD_API_VERSION, KIND, NAMESPACE, NAME, patch)

    def annotation(self) -> str | None:
        value: str | None = (self.md()["metadata"].get("annotations") or {}).get(COMMAND)
        return value
