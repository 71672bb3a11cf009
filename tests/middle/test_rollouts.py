"""Whole rollouts through ``reconcile()`` in milliseconds: the middle tier.

The real ``Reconciler`` and ``reconcile()`` run against :class:`middle.fakes.FakeKubeApi`, a
simulated Deployment controller whose pods take steps to become Ready, a fake clock and
scripted Prometheus answers (see ``middle/harness.py``). Fast feedback on the whole loop
(observe, plan, act, the 409 retry); the real control plane and real pods stay the proof.

Each of issue 12's rollout bugs has a test here (bug 8's CEL part lives in
``tests/unit/test_api.py`` and ``tests/cluster/test_validation.py``; bug 10's drain in the
builders' golden files). The table in docs/reconcile.md ("Each bug, its test") records which
of them fail on the old core (commit 8712ca8, before observe/plan/act).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from middle.fakes import Call, Json
from middle.harness import NAME, NAMESPACE, TRACK_LABEL, Harness, model
from modeldeploy_operator.metrics.prometheus import PrometheusProvider

FAILING = 0.5  # the error ratio of a bad canary (the metric's max is 0.01)


def track_of(pod: Json) -> str:
    return str(pod["metadata"]["labels"][TRACK_LABEL])


def canary(h: Harness) -> Json:
    found: Json = h.status().get("canary") or {}
    return found


def progress(h: Harness) -> str:
    """What the rollout waits for: the Progressing condition's message (its reason is
    ``Canary`` throughout)."""
    return str(h.condition("Progressing").get("message", ""))


def at_least_spec_replicas(h: Harness) -> None:
    ready, wanted = h.ready_pods(), h.md()["spec"]["replicas"]
    assert ready >= wanted, f"{ready} Ready pods, spec asks for {wanted}: {h.status()}"


def settled_on(version: str) -> Callable[[Harness], Callable[[], bool]]:
    def until(h: Harness) -> Callable[[], bool]:
        return lambda: (
            h.stable_version() == version
            and h.deployment("canary") is None
            and h.status().get("phase") == "Available"
        )

    return until


def started(doc: Json, **kw: Any) -> Harness:
    """Version 1 Available, version 2 applied: a canary is about to start."""
    h = Harness.create(doc, **kw)
    h.bring_up()
    h.set_version("2")
    return h


# -- whole rollouts ---------------------------------------------------------------------------


def test_a_healthy_canary_is_promoted_step_by_step() -> None:
    # Reads status.canary.readySince, which the old core (8712ca8) did not write.
    steps: list[Json] = [
        {"weight": 25, "pause": "20s"},
        {"weight": 50, "pause": "20s"},
        {"weight": 100},
    ]
    h = started(model(replicas=4, steps=steps))
    seen: list[tuple[float, int, float | None]] = []  # (time, step, readySince) per pass

    def record(h: Harness) -> None:
        if canary(h):
            seen.append((h.clock.now, canary(h)["step"], canary(h).get("readySince")))

    h.watch(record)
    h.run("promotion", settled_on("2")(h))

    visited = list(dict.fromkeys(step for _, step, _ in seen))
    assert visited == [0, 1, 2]  # every step, in order, none twice
    for step, pause in ((0, 20.0), (1, 20.0)):
        ready_since = next(r for _, s, r in seen if s == step and r is not None)
        left = next(t for t, s, _ in seen if s == step + 1)
        assert left - ready_since >= pause  # the whole pause, counted from Ready
        # and a passed check on Ready pods, one interval after they were Ready
        assert any(ready_since + 10.0 <= t <= left for t in h.metrics.asked_at())
    assert h.api.reasons().count("StepAdvanced") == 2
    assert h.api.reasons().count("Promoted") == 1
    history = h.status()["history"]
    assert [(e["version"], e["result"]) for e in history] == [("2", "Promoted")]
    assert {p["metadata"]["labels"]["app.kubernetes.io/version"] for p in h.pods()} == {"2"}
    assert h.ready_pods("stable") == 4
    assert h.condition("Ready")["status"] == "True"


@pytest.mark.parametrize(("replicas", "ready_after"), [(1, 4), (2, 1), (3, 4)])
def test_capacity_never_below_spec_replicas_during_canary_and_promotion(
    replicas: int, ready_after: int
) -> None:
    h = started(model(replicas=replicas), ready_after=lambda pod: ready_after)
    h.watch(at_least_spec_replicas)
    h.run("promotion", settled_on("2")(h), limit=150)
    assert h.promoted()


@pytest.mark.parametrize("replicas", [1, 3])
def test_without_a_surge_budget_at_most_one_pod_is_missing(replicas: int) -> None:
    """maxSurgeGPUs below one replica's GPUs: the documented trade, one pod fewer at most."""
    doc = model(replicas=replicas)
    doc["spec"]["rollout"]["maxSurgeGPUs"] = 0
    h = started(doc, ready_after=lambda pod: 3)
    ready: list[int] = []
    pods: list[int] = []

    def count(h: Harness) -> None:
        ready.append(h.ready_pods())
        pods.append(len(h.pods()))

    h.watch(count)
    h.run("promotion", settled_on("2")(h), limit=150)
    assert min(ready) == replicas - 1
    assert max(pods) == replicas  # and no GPU beyond the spec's


def test_a_restarted_operator_resumes_at_the_same_step() -> None:
    """All rollout state is in status: a new process (new context, empty memory) picks the
    rollout up where it was, without advancing a step twice."""
    steps: list[Json] = [{"weight": 25, "pause": "20s"}, {"weight": 50, "pause": "20s"}]
    h = started(model(replicas=4, steps=steps))
    h.run("step 2", lambda: canary(h).get("step") == 1)
    before = canary(h)
    h.restart_operator()
    h.reconcile()
    after = canary(h)
    assert (after["step"], after["stepStarted"], after["started"]) == (
        before["step"],
        before["stepStarted"],
        before["started"],
    )
    h.run("promotion", settled_on("2")(h))
    assert [e["result"] for e in h.status()["history"]] == ["Promoted"]
    assert h.api.reasons().count("StepAdvanced") == 1


def test_a_failing_analysis_rolls_the_canary_back_and_holds_the_revision() -> None:
    h = started(model(failure_limit=2))
    h.metrics.answer = FAILING
    h.run("a rollback", lambda: h.status().get("rollback") is not None)

    status = h.status()
    assert status["rollback"]["reason"] == "RolledBack"
    assert "errors = 0.5" in status["rollback"]["message"]
    assert len(h.metrics.asked_at()) == 2  # failureLimit 2: the second failed check decides
    assert h.deployment("canary") is None  # at once, not pod by pod
    assert [(e["version"], e["result"]) for e in status["history"]] == [("2", "RolledBack")]
    assert h.condition("Degraded")["reason"] == "RolledBack"
    assert "RolledBack" in h.api.reasons()
    asked, calls = len(h.metrics.queries), len(h.api.calls)
    h.steps(10)  # held: no canary again, no more analyses, stable serves version 1
    assert h.deployment("canary") is None
    assert [
        c for c in h.api.calls[calls:] if c.name == f"{NAME}-canary" and c.verb == "apply"
    ] == []
    assert len(h.metrics.queries) == asked
    assert h.stable_version() == "1"
    assert h.ready_pods("stable") == 2


def test_a_crashing_canary_is_rolled_back() -> None:
    h = started(model(), crashing=lambda pod: track_of(pod) == "canary")
    h.run("a rollback", lambda: h.status().get("rollback") is not None)
    assert "keeps crashing" in h.status()["rollback"]["message"]
    assert h.deployment("canary") is None
    assert not h.metrics.queries  # never judged: its pods never served


# -- manual commands --------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "reason"), [("abort", "Aborted"), ("rollback", "RolledBack")])
def test_abort_and_rollback_remove_the_canary_at_once(command: str, reason: str) -> None:
    h = started(model(steps=[{"weight": 50, "pause": "manual"}, {"weight": 100}]))
    h.run("the canary Ready", lambda: h.ready_pods("canary") == 1)
    h.command(command)
    h.step()
    assert h.deployment("canary") is None
    assert h.status()["rollback"]["reason"] == reason
    assert h.status()["history"][-1]["result"] == reason
    assert h.annotation() is None  # consumed
    assert h.stable_version() == "1"
    h.steps(5)
    assert h.deployment("canary") is None


def test_promote_skips_the_remaining_steps_and_a_manual_pause() -> None:
    # Waits on status.canary.readySince (not written by the old core, 8712ca8).
    steps: list[Json] = [{"weight": 50, "pause": "manual"}, {"weight": 100, "pause": "manual"}]
    h = started(model(steps=steps))
    h.run("the manual step", lambda: canary(h).get("readySince") is not None)
    h.steps(4)
    assert canary(h)["step"] == 0
    assert "waits for resume or promote" in progress(h)
    h.command("promote")
    h.step()
    assert h.annotation() is None
    assert h.status()["history"][-1]["result"] == "Promoted"
    assert h.status()["history"][-1]["reason"] == "promoted by a user"
    h.run("version 2 settled", settled_on("2")(h))


def test_pause_holds_a_timed_step_until_resume() -> None:
    # Waits on status.canary.readySince (not written by the old core, 8712ca8).
    h = started(model(steps=[{"weight": 50, "pause": "10s"}, {"weight": 100}]))
    h.run("the canary Ready", lambda: canary(h).get("readySince") is not None)
    h.command("pause")
    h.steps(12)  # a minute: far past the pause, with passed checks
    assert canary(h)["step"] == 0
    assert canary(h)["paused"] is True
    assert "paused by a user" in progress(h)
    assert h.annotation() is None
    h.command("resume")
    h.run("the next step", lambda: canary(h).get("step") == 1 or h.promoted())


def test_retry_starts_a_held_revision_over() -> None:
    h = started(model())
    h.run("the canary Ready", lambda: h.ready_pods("canary") == 1)
    h.command("abort")
    h.steps(3)
    assert h.deployment("canary") is None
    h.command("retry")
    h.run("a fresh canary", lambda: h.deployment("canary") is not None)
    assert h.status().get("rollback") is None
    assert canary(h)["step"] == 0
    h.run("version 2 promoted", settled_on("2")(h))


def test_transient_api_failures_neither_skip_nor_repeat_a_step() -> None:
    """A refused apply, a timed-out read, a 500 on the status write: the next pass redoes
    the same decision, as kopf's retry or the resync would make it."""
    steps: list[Json] = [
        {"weight": 25, "pause": "10s"},
        {"weight": 50, "pause": "10s"},
        {"weight": 100},
    ]
    h = started(model(replicas=4, steps=steps))
    faults = [
        ("apply", "Deployment", 500),
        ("get", "Deployment", 0),
        ("patch_status", "ModelDeployment", 500),
        ("merge_patch", "Deployment/scale", 0),
    ]
    visited: list[int] = []
    for _ in range(80):
        if h.api.pending_faults == 0 and faults:
            h.api.fail_next(*faults.pop(0))
        h.step()  # a failed pass is logged and queued again with backoff, as a worker does
        if canary(h):
            visited.append(canary(h)["step"])
        if settled_on("2")(h)():
            break
    # Refused applies and scales are reported (ApplyFailed) and retried; the timed-out read
    # and the refused status write end the pass, which the next one redoes.
    assert h.api.pending_faults == 0
    assert not faults
    errors = {
        reason: h.ctx.telemetry.registry.get_sample_value(
            "modeldeploy_reconcile_errors_total", {"reason": reason}
        )
        for reason in ("api_0", "api_500")
    }
    assert errors == {"api_0": 1.0, "api_500": 1.0}
    assert "ApplyFailed" in h.api.reasons()
    assert list(dict.fromkeys(visited)) == [0, 1, 2]
    assert [e["result"] for e in h.status()["history"]] == ["Promoted"]
    assert settled_on("2")(h)()


# -- issue 12's bugs, one test each -----------------------------------------------------------


def test_bug1_after_an_abort_the_next_version_gets_a_canary() -> None:
    h = started(model())
    h.run("the canary Ready", lambda: h.ready_pods("canary") == 1)
    h.command("abort")
    h.steps(2)
    assert h.status()["phase"] == "Degraded"  # Aborted: not Available
    h.set_version("3")
    h.run("a canary of version 3", lambda: canary(h).get("version") == "3")
    assert h.deployment("canary") is not None
    h.steps(3)
    assert h.stable_version() == "1"  # judged first, not straight to stable
    h.run("version 3 promoted", settled_on("3")(h))
    assert [e["result"] for e in h.status()["history"]] == ["Aborted", "Promoted"]


def test_bug2_deleting_the_stable_deployment_mid_canary_never_promotes_unanalysed() -> None:
    h = started(model())
    h.metrics.answer = None  # no data: nothing may count as analysed
    h.run("the canary Ready", lambda: h.ready_pods("canary") == 1)
    h.api.remove("apps/v1", "Deployment", NAMESPACE, f"{NAME}-stable")
    h.steps(20)
    assert not h.promoted()
    assert h.stable_version() == "1"
    assert "the stable Deployment is gone" in progress(h)
    assert h.deployment("canary") is not None  # still serving, for a user to decide
    h.command("abort")
    h.steps(1)
    assert h.status()["rollback"]["reason"] == "Aborted"


def test_bug3_stable_shrinks_only_as_canary_pods_become_ready() -> None:
    """With 1 replica any step used to take stable to 0 before the canary pod was Ready."""
    h = started(model(replicas=1), ready_after=lambda pod: 4)
    h.watch(at_least_spec_replicas)
    h.run("the canary at 100 %", lambda: canary(h).get("step") == 1)


def test_bug4_promotion_hands_over_without_losing_capacity() -> None:
    """Promotion used to delete the canary while stable's new pods were still loading."""
    h = started(model(replicas=2), ready_after=lambda pod: 4)
    h.run("the canary Ready", lambda: h.ready_pods("canary") == 1)
    h.command("promote")
    h.watch(at_least_spec_replicas)
    h.run("version 2 settled", settled_on("2")(h))


def test_bug5_a_canary_whose_checks_passed_then_failed_is_not_promoted() -> None:
    h = started(model(steps=[{"weight": 50, "pause": "30s"}], failure_limit=3))
    checks: list[float] = []

    def first_passes(promql: str) -> float:
        if h.clock.now not in checks:
            checks.append(h.clock.now)
        return 0.0 if len(checks) == 1 else FAILING

    h.metrics.script = first_passes
    h.run(
        "the end of the rollout",
        lambda: h.promoted() or h.status().get("rollback") is not None,
        limit=60,
    )
    assert not h.promoted()
    assert len(checks) == 4  # passed, failed, failed (held: the latest did not pass), failed
    assert h.status()["rollback"]["reason"] == "RolledBack"
    assert h.stable_version() == "1"


def test_bug6_a_conflict_on_the_rollback_status_does_not_bring_the_canary_back() -> None:
    h = started(model(failure_limit=2))
    h.run("the canary Ready", lambda: h.ready_pods("canary") == 1)
    h.metrics.answer = FAILING

    def records_rollback(call: Call) -> bool:
        return "rollback" in (call.body or {})

    h.api.fail_next("patch_status", "ModelDeployment", 409, match=records_rollback)
    h.run("a rollback", lambda: h.status().get("rollback") is not None)
    h.steps(5)
    calls = h.api.calls
    refused, persisted = [
        i for i, c in enumerate(calls) if c.verb == "patch_status" and records_rollback(c)
    ][:2]
    on_canary = [(i, c.verb) for i, c in enumerate(calls) if c.name == f"{NAME}-canary"]
    # Nothing is done to the canary on the strength of the refused write; it goes only once
    # the rollback is persisted, and the bad canary never comes back.
    assert [v for i, v in on_canary if refused < i < persisted and v != "get"] == []
    assert [v for i, v in on_canary if i > persisted and v in ("apply", "merge_patch")] == []
    assert h.deployment("canary") is None
    assert [e["result"] for e in h.status()["history"]] == ["RolledBack"]


def test_bug6_an_abort_set_while_the_operator_acts_is_not_lost() -> None:
    h = started(model(steps=[{"weight": 50, "pause": "manual"}, {"weight": 100}]))
    h.run("the canary Ready", lambda: h.ready_pods("canary") == 1)
    h.command("pause")
    # A user aborts between the operator's status write and its removal of the command.
    h.api.before_next("merge_patch", "ModelDeployment", lambda: h.command("abort"))
    h.run("the abort", lambda: h.status().get("rollback") is not None, limit=10)
    assert h.status()["rollback"]["reason"] == "Aborted"
    assert h.deployment("canary") is None
    assert h.annotation() is None


@pytest.mark.parametrize(
    "answer",
    [
        b"[]",  # JSON, not an object
        b'{"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}}]}}',
        b'{"status": "success", "data": {"resultType": "vector",'
        b' "result": [{"metric": {}, "value": [1, "fast"]}]}}',
        b'{"status": "success", "data": "none"}',
    ],
    ids=["a-list", "a-series-without-value", "a-value-not-a-number", "data-not-an-object"],
)
def test_bug7_malformed_prometheus_answers_do_not_abort_reconcile(answer: bytes) -> None:
    """Through the real provider's parsing: such an answer is inconclusive, never a crash."""
    h = started(model())
    h.ctx.metrics_provider = lambda url: PrometheusProvider(url, fetch=lambda u, t: answer)
    messages: list[str] = []
    h.watch(lambda h: messages.append(progress(h)))
    h.steps(10)  # raises if a reconcile does
    assert canary(h)["step"] == 0
    assert any("analysis inconclusive (errors: " in m for m in messages)
    assert h.status()["analysis"][0]["result"] == "Inconclusive"
    assert h.status().get("rollback") is None


def test_bug8_inconclusive_checks_hold_the_step_and_never_roll_back() -> None:
    """Bug 8's other half (fields accepted and ignored) is rejected by CEL:
    tests/unit/test_api.py::test_fields_that_would_be_ignored_are_rejected and
    tests/cluster/test_validation.py; the silent builtin autoscaler without Prometheus:
    tests/unit/test_autoscaling.py::test_the_builtin_engine_without_a_prometheus_url_says_so.
    """
    h = started(model(failure_limit=2))
    h.metrics.answer = None  # no traffic, or no reference profile for DriftScore
    messages: list[str] = []
    h.watch(lambda h: messages.append(progress(h)))
    h.steps(30)
    assert h.status().get("rollback") is None
    assert len(h.metrics.asked_at()) >= 10
    assert not h.promoted()
    assert canary(h)["failedChecks"] == 0
    assert any("analysis inconclusive (errors: no data)" in m for m in messages)
    h.metrics.answer = 0.0  # traffic arrives, the checks pass
    h.run("version 2 promoted", settled_on("2")(h))


def test_bug9_status_written_by_a_newer_operator_is_still_reconciled() -> None:
    h = Harness.create(model())
    h.bring_up()
    newer = {"status": {"shardMap": {"a": 1}, "canary": None, "stable": {"epoch": 7}}}
    h.api.edit("serving.modeldeploy.io/v1alpha1", "ModelDeployment", NAMESPACE, NAME, newer)
    h.set_version("2")
    h.run("a canary", lambda: h.deployment("canary") is not None, limit=10)
    h.run("version 2 promoted", settled_on("2")(h))
    assert h.status()["shardMap"] == {"a": 1}  # the newer operator's fields are kept


def test_bug10_the_pause_counts_from_the_canary_being_ready() -> None:
    """Canary pods take 30 s to load, the step pauses 20 s: it still gets its 20 s."""
    h = started(
        model(steps=[{"weight": 50, "pause": "20s"}, {"weight": 100}]),
        ready_after=lambda pod: 6 if track_of(pod) == "canary" else 1,
    )
    times: dict[str, float] = {}

    def record(h: Harness) -> None:
        if h.ready_pods("canary") >= 1:
            times.setdefault("ready", h.clock.now)
        if canary(h).get("step") == 1 or h.promoted():
            times.setdefault("advanced", h.clock.now)

    h.watch(record)
    h.run("the next step", lambda: "advanced" in times)
    assert times["advanced"] - times["ready"] >= 20.0
    assert any(times["ready"] < t < times["advanced"] for t in h.metrics.asked_at())


# -- bugs found in the new core (fixed: the latest verdict comes from status.analysis) ------


def test_a_step_held_by_inconclusive_checks_keeps_saying_why_between_checks() -> None:
    h = started(model())
    h.metrics.answer = None
    h.run("an inconclusive check", lambda: "analysis inconclusive" in progress(h))
    messages: list[str] = []
    writes = len(h.api.writes("patch_status"))
    h.watch(lambda h: messages.append(progress(h)))
    h.steps(6)  # 30 s: three checks, each as inconclusive as the last
    assert all("analysis inconclusive (errors: no data)" in m for m in messages), messages
    assert len(h.api.writes("patch_status")) - writes <= 3  # at most one write per check


# -- shadow steps -----------------------------------------------------------------------------


def test_a_shadow_step_keeps_the_canary_out_of_service_then_lets_the_same_pods_in() -> None:
    steps: list[Json] = [
        {"shadow": {"percent": 50}, "pause": "20s"},
        {"weight": 50},
        {"weight": 100},
    ]
    h = started(model(replicas=2, steps=steps))
    h.watch(at_least_spec_replicas)

    def shadowing() -> bool:
        return (
            canary(h).get("shadow") == 50
            and bool(h.pods("canary"))
            and all(
                c["status"] == "True"
                for p in h.pods("canary")
                for c in p["status"]["conditions"]
                if c["type"] == "ContainersReady"
            )
        )

    h.run("the canary loaded in its shadow step", shadowing)
    (pod,) = h.pods("canary")
    assert h.ready_pods("canary") == 0  # behind the gate: in no Service
    assert h.ready_pods("stable") == 2  # stable keeps every replica
    assert canary(h)["weight"] == 0
    config = h.api.peek("v1", "ConfigMap", NAMESPACE, f"{NAME}-shadow")
    assert config is not None
    assert '"targets": ["10.0.0.' in config["data"]["shadow.json"]
    h.run("past the shadow step", lambda: (canary(h).get("step") or 0) >= 1)
    # The same pod is let in, warm: no new canary pod.
    h.run("the canary pod Ready", lambda: h.ready_pods("canary") == 1)
    assert [p["metadata"]["name"] for p in h.pods("canary")] == [pod["metadata"]["name"]]
    assert any(c.verb == "set_pod_condition" for c in h.api.calls)
    assert (h.api.peek("v1", "ConfigMap", NAMESPACE, f"{NAME}-shadow") or {})["data"][
        "shadow.json"
    ] == "{}"
    h.run("promotion", settled_on("2")(h))


def test_a_shadow_step_that_fails_its_analysis_never_lets_the_canary_in() -> None:
    steps: list[Json] = [{"shadow": {"percent": 10}, "pause": "20s"}, {"weight": 100}]
    h = started(model(replicas=2, steps=steps))
    h.metrics.answer = FAILING
    h.run("a rollback", lambda: h.status().get("rollback") is not None)
    assert h.deployment("canary") is None
    assert not any(c.verb == "set_pod_condition" for c in h.api.calls)
    assert h.stable_version() == "1"
