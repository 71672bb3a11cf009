"""Scale from zero: where a scaled-to-zero ModelDeployment's callers go (pure).

At zero the model's Service routes to the activator (``builders/activation.py``: an
EndpointSlice beside the controller's), which holds the first requests, raises the scale and
forwards them once a pod is Ready (``status.activation`` tells it where). The two hand-overs
leave no moment without an endpoint:

- Down: the activator's slice is created first; the Deployment is held at its count until
  the slice has existed for ``SETTLE_SECONDS``, longer than kube-proxy takes to program a
  change (its minimum sync period is 1 s), and only then scaled to 0.
- Up: the slice stays until the controller's slice of the Service lists a Ready pod, so
  kube-proxy has the pods before it loses the activator; meanwhile the activator forwards
  what reaches it to the same pods.

Without an activator (none configured, or none of its pods Ready) nothing is routed; a slice
already there stays as it is, rather than leave the Service with no endpoint at all.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modeldeploy_operator.api.v1alpha1 import (
    MAX_ACTIVATION_ADDRESSES,
    ActivationStatus,
    ModelDeployment,
)
from modeldeploy_operator.builders.activation import (
    SLICE_MANAGER,
    SLICE_MANAGER_LABEL,
    Activator,
    build_activator_slice,
)
from modeldeploy_operator.builders.labels import activator_slice_name
from modeldeploy_operator.status import dig, is_terminating, pod_ready

Json = dict[str, Any]
SLICE_API = ("discovery.k8s.io/v1", "EndpointSlice")
SETTLE_SECONDS = 3.0  # the activator's slice in kube-proxy's rules before the last pod goes


@dataclass(frozen=True)
class ActivationPlan:
    apply: Json | None = None  # the activator's slice, to apply
    delete: bool = False  # the activator's slice, to delete
    hold_replicas: int | None = None  # the Deployment's count until the slice is seen
    status: ActivationStatus | None = None  # status.activation
    configured: bool = False  # an activator with Ready pods is there to route to
    requeue_after: float | None = None  # when a held scale-down may go on


def enabled(md: ModelDeployment) -> bool:
    spec = md.spec.autoscaling
    return bool(spec and spec.scale_to_zero and spec.scale_to_zero.enabled)


def ready_addresses(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """The Ready, not terminating pods' addresses, sorted (a stable status), at most
    ``MAX_ACTIVATION_ADDRESSES``."""
    found = {
        str(dig(p, "status", "podIP"))
        for p in pods
        if pod_ready(p) and not is_terminating(p) and dig(p, "status", "podIP")
    }
    return sorted(found)[:MAX_ACTIVATION_ADDRESSES]


def pods_serving(slices: Sequence[Mapping[str, Any]]) -> bool:
    """A slice other than the activator's lists a Ready endpoint: kube-proxy has a pod."""
    for piece in slices:
        labels = dig(piece, "metadata", "labels") or {}
        if labels.get(SLICE_MANAGER_LABEL) == SLICE_MANAGER:
            continue
        for endpoint in piece.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is not False:
                return True
    return False


def plan_activation(
    md: ModelDeployment,
    children: Mapping[str, Mapping[str, Any] | None],
    pods: Sequence[Mapping[str, Any]],
    activator: Activator | None,
    deployed_replicas: int | None,
    now: float,
) -> ActivationPlan:
    """The activator's slice and ``status.activation`` for this pass. ``children`` are the
    snapshot's (the Service and the EndpointSlices of it the watch holds), ``activator`` its
    Ready pods (None: none configured), ``deployed_replicas`` the stable Deployment's count."""
    name = f"EndpointSlice/{activator_slice_name(md)}"
    ours = children.get(name)
    if not enabled(md):
        return ActivationPlan(delete=ours is not None)
    service = children.get(f"Service/{md.metadata.name}")
    known = md.status.activation.service_ip if md.status.activation else None
    status = ActivationStatus.model_validate(  # no Service read: the address it knew
        {
            "serviceIP": dig(service, "spec", "clusterIP") if service else known,
            "addresses": ready_addresses(pods),
        }
    )
    slices = [obj for key, obj in children.items() if key.startswith("EndpointSlice/") and obj]
    at_zero = md.spec.desired_replicas() == 0
    usable = activator is not None and bool(activator.addresses) and bool(activator.ports)
    if not usable:  # nothing to route to: leave what is there, until pods serve
        return ActivationPlan(
            delete=ours is not None and not at_zero and pods_serving(slices), status=status
        )
    assert activator is not None  # noqa: S101 - for the type checker: usable says so
    wanted = at_zero or (ours is not None and not pods_serving(slices))
    if not wanted:
        return ActivationPlan(delete=ours is not None, status=status, configured=True)
    hold, requeue = None, None
    if at_zero and deployed_replicas:  # pods still up: they go once callers reach the activator
        created = dig(ours, "metadata", "creationTimestamp") if ours else None
        age = now - epoch_of(created) if created else 0.0
        if age < SETTLE_SECONDS:
            hold, requeue = deployed_replicas, SETTLE_SECONDS - age
    return ActivationPlan(
        apply=build_activator_slice(md, activator),
        hold_replicas=hold,
        status=status,
        configured=True,
        requeue_after=requeue,
    )


def epoch_of(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp).timestamp()
