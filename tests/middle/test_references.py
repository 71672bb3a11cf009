"""Secrets and ConfigMaps the spec names: checked by metadata only (never their data), and
only when the answer can have changed: the spec changed, one was missing, or a pod is not
Ready. At rest they cost no request."""

from __future__ import annotations

from middle.harness import NAMESPACE, Harness, model


def checks(h: Harness, since: int) -> list[str]:
    return [f"{c.kind}/{c.name}" for c in h.api.calls[since:] if c.verb == "exists"]


def secret(name: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {"token": "c2VjcmV0"},
    }


def test_a_missing_secret_is_reported_checked_again_and_clears() -> None:
    h = Harness.create(model(model={"credentialsSecret": "creds"}))
    outcome = h.reconcile()
    assert h.condition("Degraded")["reason"] == "SecretNotFound"
    assert outcome is not None
    assert outcome.requeue_after is not None
    assert outcome.requeue_after <= 10, "a missing reference is looked for again soon"
    assert not [c for c in h.api.calls if c.verb == "get" and c.kind == "Secret"], (
        "only metadata is read, never a Secret's data"
    )

    h.api.create(secret("creds"))
    h.clock.advance(10)
    since = len(h.api.calls)
    h.reconcile()
    assert checks(h, since) == ["Secret/creds"]
    assert h.condition("Degraded")["status"] == "False"


def test_references_at_rest_cost_no_request() -> None:
    h = Harness.create(model(model={"credentialsSecret": "creds"}))
    h.api.create(secret("creds"))
    h.bring_up()
    since = len(h.api.calls)
    h.steps(5)  # resyncs: nothing changed, every pod Ready
    assert checks(h, since) == []

    h.api.edit(  # a new spec: the references are looked at again
        "serving.modeldeploy.io/v1alpha1",
        "ModelDeployment",
        NAMESPACE,
        "iris",
        {"spec": {"model": {"credentialsSecret": "other"}}},
    )
    since = len(h.api.calls)
    h.reconcile()
    assert checks(h, since) == ["Secret/other"]
    assert h.condition("Degraded")["reason"] == "SecretNotFound"
