"""The cluster as the operator's watches know it: reads without requests.

The ModelDeployments come from kopf's watch (its event handler hands each one over); their
Deployments, Services and pods from one reflector per kind (``k8s/reflector.py``: list, then
watch), filtered on the server by the ``app.kubernetes.io/managed-by=modeldeploy`` label.
Every object is projected to the fields the operator reads (:func:`project`), as
controller-runtime's cache transforms do, and kept as compact JSON text: a few kilobytes per
object instead of a tree of Python dicts three times that size, immutable (so shared between
threads), and decoded by C code when a pass reads it, faster than deep-copying the tree
would be. A reconcile pass reads its snapshot from here; the API server sees writes, and the
watches' re-lists, only.

Why not kopf's own indices (``@kopf.index``), which did this until they were measured: kopf
holds every handler until each indexed object has been indexed, and each object's worker
waits on one condition that every other object's arrival wakes, re-checking every object's
toggle. That is quadratic in the objects of a kind: at 10,000 ModelDeployments 59 % of the
operator's CPU went there and the cold start never finished (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Json = dict[str, Any]
Key = tuple[str, str]  # (namespace, ModelDeployment name)

# Held per owner, read as a pass's children (those whose kind is watched: see holds()).
CHILD_KINDS = (
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "ScaledObject",
    "HTTPRoute",
    "EndpointSlice",  # the Service's (the controller's, and the activator's at zero)
)
# Of those, the ones named after their ModelDeployment: a pass knows their names up front.
NAMED_AFTER_OWNER = ("HorizontalPodAutoscaler", "ScaledObject", "HTTPRoute")

# metadata fields kept: what the planner, the drift check and the status writes read.
KEPT_METADATA = (
    "name",
    "creationTimestamp",  # the activator's slice: how long kube-proxy has had it
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "labels",
    "annotations",
    "ownerReferences",
    "deletionTimestamp",
)
# podIP: where stable's sidecars copy requests to in a shadow step.
POD_STATUS = ("phase", "conditions", "containerStatuses", "initContainerStatuses", "podIP")


def _raw(value: Any) -> Any:
    """For ``json.dumps``: kopf hands out read-only mapping views of the watched body."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


Projection = tuple[str, str]  # (resourceVersion, the projected object without it, as JSON)


def project(body: Mapping[str, Any], kind: str) -> Projection:
    """Only the fields the operator reads, as compact JSON: no managedFields, no annotations
    on children (ours carry none), of a pod only its node, readiness gates, address and the
    status fields its problems are read from. The resourceVersion is kept beside it, so two
    projections compare equal when nothing the operator reads changed."""
    meta = body.get("metadata") or {}
    kept = {k: meta[k] for k in KEPT_METADATA if k in meta and k != "resourceVersion"}
    if kind != "ModelDeployment":
        kept.pop("annotations", None)
    projected: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": kind,
        "metadata": kept,
    }
    if kind == "EndpointSlice":  # no spec or status: the endpoints and ports are the point
        for part in ("addressType", "endpoints", "ports"):
            if part in body:
                projected[part] = body[part]
    elif kind == "Pod":
        status = body.get("status") or {}
        projected["status"] = {k: status[k] for k in POD_STATUS if k in status}
        spec = body.get("spec") or {}
        # nodeName: the node cache's labels; readinessGates: the serving gate (shadow steps).
        kept_spec = {k: spec[k] for k in ("nodeName", "readinessGates") if k in spec}
        if kept_spec:
            projected["spec"] = kept_spec
    else:
        # The status of what others drive (an HPA's metrics, a route's parents) is not read:
        # kept, each of its updates would cost the owner a pass.
        others = kind in ("HorizontalPodAutoscaler", "ScaledObject", "HTTPRoute")
        parts = ("spec",) if others else ("spec", "status")
        for part in parts:
            if part in body:
                projected[part] = body[part]
    content = json.dumps(projected, separators=(",", ":"), default=_raw)
    return str(meta.get("resourceVersion") or ""), content


def expand(projection: Projection) -> Json:
    version, content = projection
    obj: Json = json.loads(content)
    if version:
        obj["metadata"]["resourceVersion"] = version
    return obj


def trigger_of(body: Mapping[str, Any]) -> str:
    """What a ModelDeployment's event must change to need a pass: the spec (generation),
    labels, annotations (the manual commands), deletion. Status alone is the operator's own
    write coming back, as controller-runtime's GenerationChangedPredicate reasons."""
    meta = body.get("metadata") or {}
    fields = [meta.get(k) for k in ("generation", "labels", "annotations", "deletionTimestamp")]
    return json.dumps(fields, separators=(",", ":"), default=_raw, sort_keys=True)


def version_of(obj: Mapping[str, Any] | None) -> str:
    """An object's resourceVersion; "" for an absent one."""
    return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")


class KindStore:
    """One child kind's objects by their ModelDeployment (the ``MD_LABEL`` label), as
    projections; a reflector's :class:`~modeldeploy_operator.k8s.reflector.Sink`. A change to
    what the operator reads of an object (its projection) calls ``on_change`` with the owner,
    which then needs a pass."""

    def __init__(self, kind: str, owner_label: str, on_change: Callable[[Key], None]) -> None:
        self.kind = kind
        self._owner_label = owner_label
        self._on_change = on_change
        self._lock = threading.Lock()
        self._objects: dict[Key, tuple[Key, Projection]] = {}  # (ns, name) -> owner, object
        self._owned: dict[Key, dict[str, Projection]] = {}  # owner -> name -> object
        self.listed = threading.Event()

    def _entry(self, obj: Mapping[str, Any]) -> tuple[Key, Key, Projection] | None:
        meta = obj.get("metadata") or {}
        namespace, name = meta.get("namespace"), meta.get("name")
        owner = (meta.get("labels") or {}).get(self._owner_label)
        if not (namespace and name and owner):
            return None
        return (namespace, name), (namespace, owner), project(obj, self.kind)

    def replace(self, items: list[Json]) -> None:
        entries = [e for e in map(self._entry, items) if e is not None]
        objects = {key: (owner, projection) for key, owner, projection in entries}
        owned: dict[Key, dict[str, Projection]] = {}
        for (_, name), (owner, projection) in objects.items():
            owned.setdefault(owner, {})[name] = projection
        with self._lock:
            before = self._objects
            self._objects, self._owned = objects, owned
        changed = {
            owner
            for key, (owner, projection) in objects.items()
            if key not in before or before[key][1][1] != projection[1]
        } | {owner for key, (owner, _) in before.items() if key not in objects}
        self.listed.set()
        for owner in changed:
            self._on_change(owner)

    def event(self, type_: str, obj: Json) -> None:
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        entry = None if type_ == "DELETED" else self._entry(obj)
        with self._lock:
            before = self._objects.pop(key, None)
            if before is not None:
                self._owned.get(before[0], {}).pop(key[1], None)
                if not self._owned.get(before[0]):
                    self._owned.pop(before[0], None)
            if entry is not None:
                _, owner, projection = entry
                self._objects[key] = (owner, projection)
                self._owned.setdefault(owner, {})[key[1]] = projection
        # Only the resourceVersion moved: nothing the operator reads changed.
        if before and entry and before[0] == entry[1] and before[1][1] == entry[2][1]:
            return
        owners: set[Key] = set()
        if before is not None:
            owners.add(before[0])
        if entry is not None:
            owners.add(entry[1])
        for owner in owners:
            self._on_change(owner)

    def owned(self, owner: Key) -> list[Json]:
        with self._lock:
            projections = list(self._owned.get(owner, {}).values())
        return [expand(p) for p in projections]

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)


Endpoints = tuple[tuple[str, ...], tuple[tuple[str, int], ...]]  # addresses, (name, port)s


def endpoints_of(slices: Iterable[Mapping[str, Any]]) -> Endpoints:
    """The Ready (not terminating) addresses and the named ports of EndpointSlices, sorted."""
    addresses: set[str] = set()
    ports: set[tuple[str, int]] = set()
    for piece in slices:
        for endpoint in piece.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is not False and not conditions.get("terminating"):
                addresses.update(endpoint.get("addresses") or ())
        for port in piece.get("ports") or []:
            if port.get("name") and port.get("port"):
                ports.add((str(port["name"]), int(port["port"])))
    return tuple(sorted(addresses)), tuple(sorted(ports))


class ActivatorStore:
    """The activator's Ready pods and ports, from its Service's EndpointSlices (a reflector's
    sink, like :class:`KindStore`); ``on_change`` runs when either changes."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._lock = threading.Lock()
        self._slices: dict[str, Json] = {}
        self.listed = threading.Event()

    def replace(self, items: list[Json]) -> None:
        with self._lock:
            before = self._current()
            self._slices = {str(i["metadata"]["name"]): i for i in items}
            after = self._current()
        self.listed.set()
        if after != before:
            self._on_change()

    def event(self, type_: str, obj: Json) -> None:
        name = str((obj.get("metadata") or {}).get("name") or "")
        with self._lock:
            before = self._current()
            if type_ == "DELETED":
                self._slices.pop(name, None)
            else:
                self._slices[name] = obj
            after = self._current()
        if after != before:
            self._on_change()

    def _current(self) -> Endpoints:
        return endpoints_of(self._slices.values())

    def current(self) -> Endpoints:
        """(Ready addresses, (port name, port) pairs), both sorted."""
        with self._lock:
            return self._current()


class ClusterCache:
    """What the watches keep, read as plain data: the ModelDeployments (kopf's watch hands
    them over, :meth:`put`), and per ModelDeployment its Deployments, Services and pods (one
    reflector each, :meth:`store`). Not ``ready`` until every child kind has been listed once;
    passes read from the API server until then.

    It also remembers, per ModelDeployment, the versions this operator has written over
    (``supersede``): a watch delivers an object's new version a moment after the write, so
    right after a write the cache still shows the old version, and a pass must not decide
    twice from it. A pass that finds such a version reads from the API server instead
    (:meth:`outdated`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._modeldeployments: dict[Key, Projection] = {}
        self._stores: dict[str, KindStore] = {}
        self._superseded: dict[Key, set[tuple[str, str]]] = {}
        self._last: dict[str, str] = {}  # object uid -> what its last event showed
        self._relevant: dict[str, bool] = {}  # object uid -> whether that event needs a pass
        self.activator: ActivatorStore | None = None  # with an activator: its endpoints

    def watch_activator(self, on_change: Callable[[], None]) -> ActivatorStore:
        """The activator's store, for its reflector to fill."""
        with self._lock:
            if self.activator is None:
                self.activator = ActivatorStore(on_change)
            return self.activator

    def store(self, kind: str, owner_label: str, on_change: Callable[[Key], None]) -> KindStore:
        """The store of a child kind, for its reflector to fill."""
        with self._lock:
            return self._stores.setdefault(kind, KindStore(kind, owner_label, on_change))

    def put(self, body: Mapping[str, Any]) -> None:
        """A ModelDeployment as its watch event shows it."""
        meta = body.get("metadata") or {}
        projection = project(body, "ModelDeployment")
        with self._lock:
            self._modeldeployments[(meta["namespace"], meta["name"])] = projection

    def drop(self, namespace: str, name: str) -> None:
        with self._lock:
            self._modeldeployments.pop((namespace, name), None)

    def note(self, uid: str, shown: str) -> None:
        """Remember what a ModelDeployment's event shows (the handler calls this, then asks
        :meth:`relevant`)."""
        with self._lock:
            before = self._last.get(uid)
            self._last[uid] = shown
            self._relevant[uid] = before != shown

    def relevant(self, uid: str, event: str | None) -> bool:
        """Whether the event just noted changed anything the operator reads. A listing
        (no event type), ADDED and DELETED always do."""
        with self._lock:
            changed = self._relevant.pop(uid, True)
            if event == "DELETED":
                self._last.pop(uid, None)
            return event in (None, "ADDED", "DELETED") or changed

    def holds(self, kind: str) -> bool:
        """Whether this cache keeps objects of ``kind`` (others are read from the API)."""
        with self._lock:
            return kind == "ModelDeployment" or (kind in CHILD_KINDS and kind in self._stores)

    def expected(self, owner: str) -> list[str]:
        """The children named after ``owner`` whose kind is held: absent from
        :meth:`children`, they do not exist."""
        named = [f"{kind}/{owner}" for kind in NAMED_AFTER_OWNER if self.holds(kind)]
        if self.holds("EndpointSlice"):  # builders.labels.activator_slice_name's
            named.append(f"EndpointSlice/{owner}-activator")
        return named

    def supersede(self, key: Key, child: str, version: str) -> None:
        """``child`` (``Kind/name``) at ``version`` ("" when it did not exist) is outdated."""
        with self._lock:
            self._superseded.setdefault(key, set()).add((child, version))

    def outdated(self, key: Key, seen: Mapping[str, Mapping[str, Any] | None]) -> bool:
        """Whether ``seen`` (objects by ``Kind/name``, as the cache shows them) still shows a
        version written over. Marks ``seen`` has moved past are dropped."""
        with self._lock:
            marks = self._superseded.get(key, set())
            stale = {(c, v) for c, v in marks if c in seen and version_of(seen[c]) == v}
            left = {(c, v) for c, v in marks if c not in seen} | stale
            if left:
                self._superseded[key] = left
            else:
                self._superseded.pop(key, None)
            return bool(stale)

    def forget(self, key: Key) -> None:
        with self._lock:
            self._superseded.pop(key, None)

    def _listers(self) -> list[KindStore | ActivatorStore]:
        with self._lock:
            stores: list[KindStore | ActivatorStore] = list(self._stores.values())
            return [*stores, self.activator] if self.activator is not None else stores

    @property
    def ready(self) -> bool:
        stores = self._listers()
        return bool(stores) and all(s.listed.is_set() for s in stores)

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        stores = self._listers()
        for store in stores:
            if not store.listed.wait(max(0.0, deadline - time.monotonic())):
                return False
        return bool(stores)

    def keys(self) -> list[Key]:
        """Every ModelDeployment the watch knows."""
        with self._lock:
            return list(self._modeldeployments)

    def modeldeployment(self, namespace: str, name: str) -> Json | None:
        with self._lock:
            projection = self._modeldeployments.get((namespace, name))
        return None if projection is None else expand(projection)

    def children(self, namespace: str, owner: str) -> dict[str, Json]:
        """The ModelDeployment's children of the held kinds, by ``Kind/name``."""
        held: dict[str, Json] = {}
        for kind in CHILD_KINDS:
            store = self._stores.get(kind)
            for obj in store.owned((namespace, owner)) if store else []:
                held[f"{obj['kind']}/{obj['metadata']['name']}"] = obj
        return held

    def pods(self, namespace: str, owner: str) -> tuple[Json, ...]:
        store = self._stores.get("Pod")
        return tuple(store.owned((namespace, owner))) if store else ()

    def sizes(self) -> dict[str, int]:
        """How many objects each kind holds (for the operator's metrics)."""
        with self._lock:
            sizes = {k: len(s) for k, s in self._stores.items()}
            sizes["ModelDeployment"] = len(self._modeldeployments)
        return sizes
