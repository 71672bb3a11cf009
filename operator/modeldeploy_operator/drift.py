"""Does a child still match what we want? A pure check that saves writes.

Reconcile applies a child only when the observed object no longer contains the desired one:
restarts and periodic resyncs then cost reads, not writes, while hand edits (a changed or
removed field, a deleted object) are still taken back by server-side apply. What apply
cannot take back (fields and list entries someone else added, which stay theirs) the act
layer replaces, for a Deployment's pod template (``act.apply_objects``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Maps the API server does not default into: a key in them that we did not set was added by
# someone else (``privileged: true``, an added capability, a sysctl), so it is drift too.
EXACT = frozenset({"securityContext"})


def contains(observed: object, desired: object, *, exact: bool = False) -> bool:
    """True when every field of ``desired`` is in ``observed`` with the same value.

    Maps may have extra keys (server defaults, other managers' fields), except inside the
    maps named in ``EXACT``; lists must have the same length and match item by item;
    scalars must be equal.
    """
    if isinstance(desired, Mapping):
        if not isinstance(observed, Mapping) or (exact and set(observed) - set(desired)):
            return False
        return all(
            key in observed and contains(observed[key], value, exact=exact or key in EXACT)
            for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(observed, list)
            and len(observed) == len(desired)
            and all(contains(o, d, exact=exact) for o, d in zip(observed, desired, strict=True))
        )
    return bool(observed == desired)


def others_in_template(obj: Mapping[str, Any], ours: str) -> list[str]:
    """The field managers other than ``ours`` that own fields of the pod template's spec
    (``metadata.managedFields``): hand edits that server-side apply leaves in place. Drift
    without them (a value the API server writes in another form, say) is not theirs to undo."""
    found = []
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        fields = (entry.get("fieldsV1") or {}).get("f:spec", {}).get("f:template", {})
        if entry.get("manager") != ours and "f:spec" in fields:
            found.append(str(entry.get("manager")))
    return found


def needs_apply(observed: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Apply when the object is missing or differs in a field we set (status aside): the
    metadata, and the spec, or a ConfigMap's data."""
    if observed is None:
        return True
    fields = [key for key in desired if key not in ("apiVersion", "kind", "status")]
    return not all(contains(observed.get(key), desired[key]) for key in fields)
