"""Secrets and ConfigMaps the spec names. ConfigMaps are checked by metadata only, Secrets never
read at all: a missing Secret is learned from the kubelet's FailedMount Event about a pod that
waits for it (this tier's kubelet posts it as the real one does; the real one in
realnode/test_secrets.py). Looked at only when the answer can have changed: the spec changed,
one was missing, or a pod is not Ready. At rest they cost no request."""

from __future__ import annotations

from middle.harness import NAMESPACE, Harness, model


def looks(h: Harness, since: int) -> list[str]:
    return [f"{c.verb} {c.kind}/{c.name}" for c in h.api.calls[since:] if c.verb in LOOKS]


LOOKS = ("exists", "events_of")
OTHER = {"name": "x"}  # a ConfigMap that does not exist


def secret(name: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {"token": "c2VjcmV0"},
    }


def test_a_missing_secret_is_learned_from_the_pod_that_waits_for_it_and_clears() -> None:
    h = Harness.create(model(model={"credentialsSecret": "creds"}))
    h.run(
        "Degraded for the missing Secret",
        lambda: (h.condition("Degraded") or {}).get("reason") == "SecretNotFound",
    )
    message = h.condition("Degraded")["message"]
    assert "spec.model.credentialsSecret" in message
    assert "creds" in message
    outcome = h.outcomes[-1]
    assert outcome is not None
    assert outcome.requeue_after is not None
    assert outcome.requeue_after <= 10, "a missing reference is looked for again soon"
    assert not [c for c in h.api.calls if c.kind == "Secret"], "a Secret is never read"

    h.api.create(secret("creds"))  # the kubelet mounts it on its next try; the pod starts
    h.run("Degraded clears", lambda: h.condition("Degraded")["status"] == "False")
    assert not [c for c in h.api.calls if c.kind == "Secret"]


def test_a_secret_mounted_under_another_name_is_not_taken_for_ours() -> None:
    """The Event names the volume and the Secret: only a FailedMount of our volume, for the
    Secret the spec names now, counts."""
    h = Harness.create(model(model={"credentialsSecret": "creds"}))
    h.run(
        "Degraded for the missing Secret",
        lambda: (h.condition("Degraded") or {}).get("reason") == "SecretNotFound",
    )
    h.api.create(secret("other"))
    h.api.edit(
        "serving.modeldeploy.io/v1alpha1",
        "ModelDeployment",
        NAMESPACE,
        "iris",
        {"spec": {"model": {"credentialsSecret": "other"}}},
    )
    h.run("Degraded clears", lambda: h.condition("Degraded")["status"] == "False")


def test_references_at_rest_cost_no_request() -> None:
    profile = {"configMapRef": {"name": "profile"}}
    h = Harness.create(
        model(
            model={"credentialsSecret": "creds"},
            monitoring={"runtime": {"enabled": True, "referenceProfile": profile}},
        )
    )
    h.api.create(secret("creds"))
    h.api.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "profile", "namespace": NAMESPACE},
            "data": {"profile.json": "{}"},
        }
    )
    h.bring_up()
    since = len(h.api.calls)
    h.steps(5)  # resyncs: nothing changed, every pod Ready
    assert looks(h, since) == []

    h.api.edit(  # a new spec: the references are looked at again
        "serving.modeldeploy.io/v1alpha1",
        "ModelDeployment",
        NAMESPACE,
        "iris",
        {"spec": {"monitoring": {"runtime": {"referenceProfile": {"configMapRef": OTHER}}}}},
    )
    since = len(h.api.calls)
    h.reconcile()
    assert looks(h, since) == ["exists ConfigMap/x"]  # no pod waits: no Event is read
    assert h.condition("Degraded")["reason"] == "ConfigMapNotFound"
