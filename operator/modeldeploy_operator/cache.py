"""The cluster as the operator's watches know it: reads without requests.

kopf keeps one watch per resource kind and, before it runs any handler, fills in-memory
indices from them (``@kopf.index``, declared in ``handlers.py``): the ModelDeployments, their
Deployments and Services, and their pods. The child and pod watches are filtered on the
server by the ``app.kubernetes.io/managed-by=modeldeploy`` label, and every object is
projected to the fields the operator reads (:func:`project`), as controller-runtime's cache
transforms do, and kept as compact JSON text: a few kilobytes per object instead of a tree of
Python dicts three times that size, immutable (so shared between threads without locks), and
decoded by C code when a pass reads it, faster than deep-copying the tree would be. A
reconcile pass reads its snapshot from here; the API server sees writes, and the watches'
re-lists, only.

The indices are kopf's, mutated on its event loop; passes read them from worker threads, and
retry a read that a concurrent update interrupts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

Json = dict[str, Any]
Key = tuple[str, str]  # (namespace, ModelDeployment name)
T = TypeVar("T")

MODELDEPLOYMENTS = "modeldeployments"
CHILDREN = ("deployments", "services")  # the plurals of the kinds held, per owner
PODS = "pods"

# metadata fields kept: what the planner, the drift check and the status writes read.
KEPT_METADATA = (
    "name",
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "labels",
    "annotations",
    "ownerReferences",
    "deletionTimestamp",
)
POD_STATUS = ("phase", "conditions", "containerStatuses", "initContainerStatuses")


def _raw(value: Any) -> Any:
    """For ``json.dumps``: kopf hands out read-only mapping views of the watched body."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


Projection = tuple[str, str]  # (resourceVersion, the projected object without it, as JSON)


def project(body: Mapping[str, Any], kind: str) -> Projection:
    """Only the fields the operator reads, as compact JSON: no managedFields, no pod spec, no
    annotations on children (ours carry none), just the status fields a pod's problems are
    read from. The resourceVersion is kept beside it, so two projections compare equal when
    nothing the operator reads changed."""
    meta = body.get("metadata") or {}
    kept = {k: meta[k] for k in KEPT_METADATA if k in meta and k != "resourceVersion"}
    if kind != "ModelDeployment":
        kept.pop("annotations", None)
    projected: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": kind,
        "metadata": kept,
    }
    if kind == "Pod":
        status = body.get("status") or {}
        projected["status"] = {k: status[k] for k in POD_STATUS if k in status}
    else:
        for part in ("spec", "status"):
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


def _copied(read: Callable[[], T]) -> T:
    """Run a read that copies from kopf's indices; an update on kopf's loop during the copy
    ("changed size during iteration") is retried."""
    for _ in range(5):
        try:
            return read()
        except RuntimeError:
            continue
    return read()


def version_of(obj: Mapping[str, Any] | None) -> str:
    """An object's resourceVersion; "" for an absent one."""
    return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")


class ClusterCache:
    """The indices kopf keeps, read as plain data. Empty and not ``ready`` until kopf has
    listed every indexed kind once (its handlers run only from then on).

    It also remembers, per ModelDeployment, the versions this operator has written over
    (``supersede``): kopf updates an index between an object's events, so right after a
    write the cache still shows the old version, and a pass must not decide twice from it.
    A pass that finds such a version reads from the API server instead (:meth:`outdated`).
    """

    def __init__(self) -> None:
        self._indices: Mapping[str, Mapping[Any, Iterable[Any]]] = {}
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._superseded: dict[Key, set[tuple[str, str]]] = {}
        self._last: dict[str, str] = {}  # object uid -> what its last event showed
        self._relevant: dict[str, bool] = {}  # object uid -> whether that event needs a pass

    def note(self, uid: str, shown: str) -> None:
        """Remember what an object's event shows (the index function calls this, just before
        kopf runs the event's handler, which then asks :meth:`relevant`)."""
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

    @staticmethod
    def holds(kind: str) -> bool:
        """Whether this cache keeps objects of ``kind`` (others are read from the API)."""
        return kind in ("ModelDeployment", "Deployment", "Service")

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

    def attach(self, indices: Mapping[str, Mapping[Any, Iterable[Any]]]) -> None:
        """kopf's live index objects, by id (handed to the startup handler)."""
        self._indices = dict(indices)

    def mark_ready(self) -> None:
        self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and bool(self._indices)

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout) and bool(self._indices)

    def _values(self, index: str, key: Key) -> list[Json]:
        found = self._indices.get(index)
        if found is None:
            return []
        return [expand(v) for v in _copied(lambda: list(found.get(key, ())))]

    def keys(self) -> list[Key]:
        """Every ModelDeployment the watch knows."""
        found = self._indices.get(MODELDEPLOYMENTS)
        if found is None:
            return []
        return _copied(lambda: [k for k in list(found) if isinstance(k, tuple)])

    def modeldeployment(self, namespace: str, name: str) -> Json | None:
        values = self._values(MODELDEPLOYMENTS, (namespace, name))
        return values[0] if values else None

    def children(self, namespace: str, owner: str) -> dict[str, Json]:
        """The ModelDeployment's Deployments and Services, by ``Kind/name``."""
        held: dict[str, Json] = {}
        for plural in CHILDREN:
            for obj in self._values(plural, (namespace, owner)):
                held[f"{obj['kind']}/{obj['metadata']['name']}"] = obj
        return held

    def pods(self, namespace: str, owner: str) -> tuple[Json, ...]:
        return tuple(self._values(PODS, (namespace, owner)))
