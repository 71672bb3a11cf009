"""The builtin autoscaler through the real reconcile, on the fake API and clock.

One pass observes (Prometheus through the scripted provider), decides (pure), and acts: the
status that records the decision first, then ``spec.replicas`` through the scale
subresource, preconditioned on the version the status write produced, then the children at
the new count. The pass never reads its own object back.
"""

from __future__ import annotations

from middle.fakes import Call
from middle.harness import NAME, NAMESPACE, Harness, model

SCALE = "ModelDeployment/scale"


def autoscaled(minimum: int = 1, maximum: int = 4) -> Harness:
    doc = model(
        replicas=minimum,
        autoscaling={
            "minReplicas": minimum,
            "maxReplicas": maximum,
            "interval": "15s",
            "metrics": [{"type": "InFlightPerReplica", "target": 4}],
        },
    )
    h = Harness.create(doc)
    h.metrics.answer = 0.0
    h.bring_up()
    return h


def writes(h: Harness, since: int) -> list[Call]:
    return [c for c in h.api.calls[since:] if c.verb not in {"get", "list"}]


def test_a_scale_up_is_decided_written_and_carried_out_in_one_pass() -> None:
    h = autoscaled()
    h.metrics.answer = 12.0  # 12 requests in flight, 4 per replica: 3 replicas
    h.clock.advance(15)
    since = len(h.api.calls)
    h.reconcile()

    calls = h.api.calls[since:]
    # One read: the pass's own start (the middle tier runs no watch cache); none mid-pass.
    reads = [c for c in calls if c.verb == "get" and c.kind == "ModelDeployment"]
    assert len(reads) == 1, "the pass read its own object back"
    verbs = [(c.verb, c.kind) for c in writes(h, since)]
    status_at = verbs.index(("patch_status", "ModelDeployment"))
    scale_at = verbs.index(("merge_patch", SCALE))
    assert status_at < scale_at, f"the decision is recorded before it is carried out: {verbs}"
    scale = next(c for c in calls if c.kind == SCALE)
    assert scale.body is not None
    assert scale.body["spec"] == {"replicas": 3}
    assert scale.body["metadata"]["resourceVersion"], "the scale write is preconditioned"
    assert h.md()["spec"]["replicas"] == 3
    stable = h.deployment("stable")
    assert stable is not None
    assert stable["spec"]["replicas"] == 3, "the children follow in the same pass"
    decision = h.status()["autoscaling"]["lastDecision"]
    assert (decision["from"], decision["to"]) == (1, 3)

    h.reconcile()  # the watch's event for the new generation
    assert h.status()["observedGeneration"] == h.md()["metadata"]["generation"]


def test_a_conflicting_scale_write_is_decided_again_from_what_is_there() -> None:
    """Somebody scaled by hand between our status write and our scale write: the 409 sends
    the object round again, and the autoscaler evaluates afresh instead of trusting the
    status it had just written."""
    h = autoscaled()
    h.metrics.answer = 12.0
    h.clock.advance(15)

    def by_hand() -> None:
        h.api.merge_patch(
            "serving.modeldeploy.io/v1alpha1",
            SCALE,
            NAMESPACE,
            NAME,
            {"spec": {"replicas": 2}},
            field_manager="kubectl",
        )

    h.api.before_next("merge_patch", SCALE, by_hand)
    asked = len(h.metrics.queries)
    h.reconcile()  # our scale write meets the hand-made one: 409
    assert h.md()["spec"]["replicas"] == 2
    h.reconcile()
    assert len(h.metrics.queries) > asked + 1, "evaluated again after the conflict"
    assert h.md()["spec"]["replicas"] == 3
    decision = h.status()["autoscaling"]["lastDecision"]
    assert (decision["from"], decision["to"]) == (2, 3)


def test_an_evaluation_waits_for_the_interval() -> None:
    h = autoscaled()
    h.metrics.answer = 12.0
    h.clock.advance(5)  # the last evaluation was at most 5 s ago: not due
    asked = len(h.metrics.queries)
    h.reconcile()
    assert len(h.metrics.queries) == asked
    assert h.md()["spec"]["replicas"] == 1
