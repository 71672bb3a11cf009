"""The rollout planner: table tests of its capacity rule, and properties over random
sequences of observations driven through a small simulation of two Deployments.

The simulation plays the Deployment controller (a rolling update with the spec's surge) and
pods that become Ready some passes after they are created; the planner's status is fed back
as the next pass's ``md.status``, exactly as the reconciler persists it. Hypothesis draws the
rest: how long pods take, time between passes, analysis results, commands, spec changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeldeploy_operator.api.v1alpha1 import ModelDeployment, ModelDeploymentStatus, TrackStatus
from modeldeploy_operator.rollout.decide import Step
from modeldeploy_operator.rollout.plan import (
    Check,
    RolloutPlan,
    Targets,
    TrackState,
    World,
    analysis_due,
    mode,
    plan_rollout,
    targets,
)
from support import load_example, merged


def iris(replicas: int = 2, surge_gpus: int | None = None, **rollout: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"replicas": replicas}
    if surge_gpus is not None:
        spec["rollout"] = {"maxSurgeGPUs": surge_gpus}
    doc = merged(load_example("iris.yaml"), {"spec": spec, "metadata": {"namespace": "ns"}})
    doc["spec"]["rollout"].update(rollout)
    return doc


def model(doc: dict[str, Any], status: ModelDeploymentStatus | None = None) -> ModelDeployment:
    md = ModelDeployment.model_validate(doc)
    return md if status is None else md.model_copy(update={"status": status})


PROMOTED = ModelDeploymentStatus(stable=TrackStatus(version="1", revision="r1"))


def world(
    stable: tuple[str, int, int] | None, canary: tuple[str, int, int] | None, **kw: Any
) -> World:
    """Tracks as (revision, replicas, ready)."""

    def track(t: tuple[str, int, int] | None) -> TrackState:
        if t is None:
            return TrackState()
        return TrackState(True, t[0], t[1], t[2], rolled=t[2] >= t[1])

    return World(track(stable), track(canary), **kw)


@pytest.mark.parametrize(
    ("replicas", "surge_gpus", "seen", "weight", "expected"),
    [
        # Bug 3: stable shrinks only as canary pods become Ready; the canary grows in the surge.
        (2, None, world(("r1", 2, 2), None), 50, (2, 1)),
        (2, None, world(("r1", 2, 2), ("r2", 1, 1)), 50, (1, 1)),
        (1, None, world(("r1", 1, 1), None), 50, (1, 1)),
        (1, None, world(("r1", 1, 1), ("r2", 1, 1)), 50, (0, 1)),
        (2, None, world(("r1", 1, 1), ("r2", 1, 1)), 100, (1, 2)),
        (2, None, world(("r1", 1, 1), ("r2", 2, 2)), 100, (0, 2)),
        # No surge budget (maxSurgeGPUs 0): one pod may be missing while pods swap.
        (2, 0, world(("r1", 2, 2), None), 50, (1, 1)),
        (1, 0, world(("r1", 1, 1), None), 100, (0, 1)),
        # A budget of two replicas' GPUs: the whole canary at once.
        (2, 2, world(("r1", 2, 2), None), 100, (2, 2)),
    ],
)
def test_canary_targets_keep_capacity(
    replicas: int,
    surge_gpus: int | None,
    seen: World,
    weight: int,
    expected: tuple[int, int],
) -> None:
    md = model(iris(replicas, surge_gpus), PROMOTED)
    planned = targets(md, "r2", "canary", Step(weight=weight), seen)
    assert planned.canary == "apply"
    assert (planned.stable_replicas, planned.canary_replicas) == expected


@pytest.mark.parametrize(
    ("seen", "expected"),
    [
        # Bug 4: promotion rolls stable while the canary serves, canary pods leave as new
        # stable pods become Ready.
        (world(("r1", 0, 0), ("r2", 2, 2)), (1, "scale", 2)),
        (world(("r2", 1, 1), ("r2", 2, 2)), (2, "scale", 1)),
        (world(("r2", 2, 2), ("r2", 1, 1)), (2, "delete", 0)),
        # The spec went back to the promoted revision mid-canary: the same handover.
        (world(("r2", 1, 1), ("r0", 1, 1)), (2, "scale", 1)),
        (world(("r2", 2, 2), ("r0", 1, 1)), (2, "delete", 0)),
    ],
)
def test_promotion_hands_over_pod_by_pod(seen: World, expected: tuple[int, str, int]) -> None:
    status = ModelDeploymentStatus(stable=TrackStatus(version="2", revision="r2"))
    planned = targets(model(iris(2), status), "r2", "rolling", Step(weight=0), seen)
    assert planned.stable == "apply"
    assert (planned.stable_replicas, planned.canary, planned.canary_replicas) == expected


def test_a_canary_overtaken_by_a_newer_spec_is_retired_before_the_new_one_starts() -> None:
    md = model(iris(2), PROMOTED)
    overtaken = world(("r1", 0, 0), ("r2", 2, 2))
    assert targets(md, "r3", "canary", Step(weight=50), overtaken) == Targets(
        "scale", 1, "scale", 2
    )
    back = world(("r1", 2, 2), ("r2", 1, 1))
    assert targets(md, "r3", "canary", Step(weight=50), back) == Targets("scale", 2, "delete", 0)


def test_a_rollback_or_abort_removes_the_canary_at_once_and_holds_the_revision() -> None:
    status = PROMOTED.model_copy(
        update={"canary": TrackStatus(revision="r2", step=0, ready_since=0.0)}
    )
    md = model(iris(2), status)
    plan = plan_rollout(md, "r2", world(("r1", 1, 1), ("r2", 1, 1), command="abort"), 100.0)
    assert plan.mode == "held"
    assert (plan.targets.stable, plan.targets.stable_replicas) == ("scale", 2)
    assert plan.targets.canary == "delete"
    assert plan.view.rollback is not None
    assert plan.view.rollback.reason == "Aborted"
    # Bug 1: the next revision is a canary again, although the object is Degraded now.
    after = md.model_copy(
        update={"status": status.model_copy(update={"canary": None, "phase": "Degraded"})}
    )
    assert mode(after, "r3") == "canary"


def test_stable_is_recorded_once_it_has_fully_rolled_out() -> None:
    """Until a first revision has rolled out there is nothing to judge a canary against."""
    md = model(iris(2))
    rolling = plan_rollout(md, "r1", world(("r1", 2, 1), None), 10.0)
    assert rolling.view.stable is None
    rolled = plan_rollout(md, "r1", world(("r1", 2, 2), None), 10.0)
    assert rolled.view.stable == TrackStatus(version="1", revision="r1")


def test_analysis_is_due_an_interval_after_the_canary_pods_are_ready() -> None:
    status = PROMOTED.model_copy(
        update={"canary": TrackStatus(revision="r2", step=0, ready_since=100.0)}
    )
    md = model(iris(2), status)  # interval 10 s
    ready = world(("r1", 1, 1), ("r2", 1, 1))
    assert not analysis_due(md, "r2", ready, 105.0)
    assert analysis_due(md, "r2", ready, 110.0)
    assert not analysis_due(md, "r2", world(("r1", 2, 2), ("r2", 1, 0)), 200.0)


# -- properties -----------------------------------------------------------------------------


@dataclass
class Pod:
    revision: str
    ready_in: int  # passes until Ready; 0: Ready


@dataclass
class SimDeployment:
    """The Deployment controller, one pass at a time: a rolling update that keeps
    ``replicas - unavailable`` Ready pods and at most ``replicas + surge`` pods."""

    revision: str
    replicas: int
    pods: list[Pod] = field(default_factory=list)

    def ready(self, revision: str | None = None) -> int:
        return sum(1 for p in self.pods if p.ready_in == 0 and revision in (None, p.revision))

    def state(self) -> TrackState:
        new = [p for p in self.pods if p.revision == self.revision]
        rolled = len(new) == len(self.pods) == self.replicas and self.ready() == self.replicas
        return TrackState(True, self.revision, self.replicas, self.ready(self.revision), rolled)

    def sync(self, surge: int, unavailable: int, delays: list[int]) -> None:
        def old() -> list[Pod]:
            return [p for p in self.pods if p.revision != self.revision]

        new = [p for p in self.pods if p.revision == self.revision]
        while len(new) < self.replicas and len(self.pods) < self.replicas + surge:
            pod = Pod(self.revision, delays.pop() if delays else 1)
            new.append(pod)
            self.pods.append(pod)
        for pod in sorted(old(), key=lambda p: p.ready_in == 0):  # not-Ready ones first
            if pod.ready_in > 0 or self.ready() - 1 >= self.replicas - unavailable:
                self.pods.remove(pod)
        while not old() and len(self.pods) > self.replicas:
            victim = max(self.pods, key=lambda p: p.ready_in)
            self.pods.remove(victim)

    def tick(self) -> None:
        for pod in self.pods:
            pod.ready_in = max(0, pod.ready_in - 1)


def carry_out(
    plan: RolloutPlan, revision: str, deployments: dict[str, SimDeployment | None]
) -> None:
    stable, canary = deployments["stable"], deployments["canary"]
    t = plan.targets
    if t.stable == "apply":
        if stable is None:
            deployments["stable"] = SimDeployment(revision, t.stable_replicas)
        else:
            stable.revision, stable.replicas = revision, t.stable_replicas
    elif t.stable == "scale" and stable is not None:
        stable.replicas = t.stable_replicas
    if t.canary == "delete":
        deployments["canary"] = None
    elif t.canary == "scale" and canary is not None:
        canary.replicas = t.canary_replicas
    elif canary is None:
        deployments["canary"] = SimDeployment(revision, t.canary_replicas)
    else:
        canary.revision, canary.replicas = revision, t.canary_replicas


results = st.sampled_from(["Passed", "Passed", "Passed", "Failed", "Inconclusive"])
commands = st.sampled_from([None] * 12 + ["pause", "resume", "promote", "abort", "rollback"])
safe_commands = st.sampled_from([None] * 12 + ["pause", "resume", "promote"])


@st.composite
def rollouts(draw: st.DrawFn, safe: bool) -> dict[str, Any]:
    replicas = draw(st.integers(1, 4))
    steps = draw(st.lists(st.integers(1, 100), min_size=1, max_size=4, unique=True).map(sorted))
    pauses = draw(st.lists(st.sampled_from([None, "5s", "30s"]), min_size=4, max_size=4))
    doc = iris(
        replicas,
        draw(st.sampled_from([None, 1, 2])) if safe else draw(st.sampled_from([None, 0, 1])),
        steps=[
            {"weight": w, **({"pause": p} if p else {})}
            for w, p in zip(steps, pauses, strict=False)
        ],
    )
    passes = draw(st.integers(5, 60))
    return {
        "doc": doc,
        "passes": [
            {
                "dt": draw(st.sampled_from([1.0, 3.0, 11.0, 31.0])),
                "result": draw(st.sampled_from(["Passed", "Inconclusive"]) if safe else results),
                "command": draw(safe_commands if safe else commands),
                "new_revision": (not safe or draw(st.booleans())) and draw(st.integers(0, 30)) == 0,
                "delays": draw(st.lists(st.integers(0, 4), min_size=4, max_size=4)),
            }
            for _ in range(passes)
        ],
    }


def simulate(case: dict[str, Any], check: Any) -> None:
    """Run a rollout from a fully rolled-out r1 to r2 (and maybe later revisions) and call
    ``check(md, revision, plan, deployments)`` after every pass."""
    md = model(case["doc"], PROMOTED)
    total = md.spec.desired_replicas()
    surge, unavailable = md.spec.surge()
    stable = SimDeployment("r1", total, [Pod("r1", 0) for _ in range(total)])
    deployments: dict[str, SimDeployment | None] = {"stable": stable, "canary": None}
    revision, number, now = "r2", 2, 1000.0
    for step in case["passes"]:
        now += step["dt"]
        if step["new_revision"]:
            number += 1
            revision = f"r{number}"
        command = step["command"]
        if command == "retry" or (command is not None and md.status.canary is None):
            command = None
        tracks = {k: (d.state() if d else TrackState()) for k, d in deployments.items()}
        seen = World(tracks["stable"], tracks["canary"], command)
        if analysis_due(md, revision, seen, now):
            seen = World(seen.stable, seen.canary, command, Check(step["result"], "m", (), now))
        plan = plan_rollout(md, revision, seen, now)
        assert plan_rollout(md, revision, seen, now) == plan  # deciding is deterministic
        check(md, revision, seen, plan, deployments)
        view = plan.view
        md = md.model_copy(
            update={
                "status": md.status.model_copy(
                    update={
                        "stable": view.stable,
                        "canary": view.canary,
                        "rollback": view.rollback,
                        "history": list(view.history),
                    }
                )
            }
        )
        carry_out(plan, revision, deployments)
        for deployment in deployments.values():
            if deployment is not None:
                deployment.sync(surge, unavailable, list(step["delays"]))
                deployment.tick()
                deployment.sync(surge, unavailable, list(step["delays"]))


@settings(max_examples=300, deadline=None)
@given(rollouts(safe=False))
def test_never_promotes_an_unanalysed_or_failing_revision_nor_advances_twice(
    case: dict[str, Any],
) -> None:
    def check(
        md: ModelDeployment,
        revision: str,
        seen: World,
        plan: RolloutPlan,
        _: dict[str, SimDeployment | None],
    ) -> None:
        decision = plan.decision
        before = (
            md.status.canary if md.status.canary and md.status.canary.revision == revision else None
        )
        step = before.step or 0 if before else 0
        if decision is None:
            return
        assert decision.progress.step - step in (0, 1)  # never a step twice
        if decision.action == "Promote" and seen.command != "promote":
            passed = (before.passed_checks or 0) if before else 0
            latest = seen.check.result if seen.check else None
            # The latest check of the last step passed, in this pass or since the last
            # failed or inconclusive one.
            assert latest == "Passed" or (latest is None and passed >= 1)
            assert step == len(md.spec.rollout.steps) - 1  # type: ignore[union-attr]

    simulate(case, check)


@settings(max_examples=300, deadline=None)
@given(rollouts(safe=True))
def test_never_fewer_ready_pods_than_the_spec_while_a_canary_runs(case: dict[str, Any]) -> None:
    def check(
        md: ModelDeployment,
        revision: str,
        seen: World,
        plan: RolloutPlan,
        deployments: dict[str, SimDeployment | None],
    ) -> None:
        ready = sum(d.ready() for d in deployments.values() if d is not None)
        assert ready >= md.spec.desired_replicas(), (deployments, plan.targets)

    simulate(case, check)


def test_the_digest_the_pods_reported_reaches_the_tracks_and_the_history() -> None:
    """What status says a track serves is what its fetchers verified, and history keeps it."""
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    md = model(iris(2))
    stable = TrackState(True, "r1", 2, 2, rolled=True, digest=a)
    rolled = plan_rollout(md, "r1", World(stable, TrackState()), 10.0)
    assert rolled.view.stable == TrackStatus(version="1", revision="r1", digest=a)

    status = ModelDeploymentStatus(
        stable=rolled.view.stable,
        canary=TrackStatus(revision="r2", step=0, ready_since=0.0),
    )
    canary = TrackState(True, "r2", 1, 1, rolled=True, digest=b)
    running = plan_rollout(model(iris(2), status), "r2", World(stable, canary), 20.0)
    assert running.view.canary is not None
    assert running.view.canary.digest == b
    promoted = plan_rollout(
        model(iris(2), status), "r2", World(stable, canary, command="promote"), 30.0
    )
    assert promoted.view.stable is not None
    assert promoted.view.stable.digest == b
    assert [(h.result, h.digest) for h in promoted.view.history] == [("Promoted", b)]
