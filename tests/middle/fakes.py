"""In-memory stand-ins for the cluster, the clock and Prometheus: the middle test tier.

- :class:`FakeKubeApi` implements :class:`~modeldeploy_operator.k8s.client.KubeApi` over a
  dict: resourceVersion and generation bookkeeping, server-side apply as a merge of the
  applied manifest (fields this manager applied before and no longer applies are removed),
  JSON merge patches (with the ``Deployment/scale`` and ``ModelDeployment/scale``
  subresources and a ``metadata.resourceVersion`` precondition), the status subresource with
  its precondition, label selectors, recorded Events, and injected faults.
- :class:`DeploymentController` plays the Deployment controller, the ReplicaSets, the
  garbage collector and the kubelet over the fake's Deployments and Pods, one step at a time:
  a rolling update within maxSurge/maxUnavailable, pods Ready some steps after they are made.
- :class:`FakeClock` and :class:`ScriptedMetrics` stand in for ``ctx.epoch``/``ctx.clock``
  and ``ctx.metrics_provider``.

Fast feedback, never the proof: the real control plane and real pods stay the proof
(``tests/cluster``, ``tests/realnode``).
"""

from __future__ import annotations

import builtins
import copy
import datetime as dt
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modeldeploy_operator.k8s.client import FIELD_MANAGER, ApiError

Json = dict[str, Any]
Key = tuple[str, str, str, str]  # (apiVersion, kind, namespace or "", name)

MD_API_VERSION = "serving.modeldeploy.io/v1alpha1"
CLUSTER_SCOPED = {"Node"}
SCALABLE = {"Deployment": "apps/v1", "ModelDeployment": MD_API_VERSION}
TEMPLATE_HASH = "pod-template-hash"
OWNER_ANNOTATION = "middle.modeldeploy.io/deployment"  # which Deployment made a pod (sim only)


@dataclass(frozen=True)
class Call:
    """One request the operator made: ``verb`` is the KubeApi method's name, ``kind`` as
    passed (``Deployment/scale`` for a subresource), ``body`` what was sent."""

    verb: str
    kind: str
    namespace: str
    name: str
    body: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RecordedEvent:
    kind: str
    name: str
    type: str
    reason: str
    message: str


@dataclass
class Fault:
    """Make matching calls fail: ``status`` 0 is a timeout, like the real client's."""

    verb: str
    kind: str | None
    status: int
    message: str
    times: int
    match: Callable[[Call], bool] | None


@dataclass
class Hook:
    """Run ``action`` just before a matching call is served (a user writing meanwhile)."""

    verb: str
    kind: str | None
    action: Callable[[], None]
    match: Callable[[Call], bool] | None


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge, ``None`` removes a key, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out: Json = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _prune(current: Json, before: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Remove from ``current`` the map keys a manager applied ``before`` and no longer does."""
    for key, value in before.items():
        if key not in now:
            current.pop(key, None)
        elif (
            isinstance(value, Mapping)
            and isinstance(now[key], Mapping)
            and isinstance(current.get(key), dict)
        ):
            _prune(current[key], value, now[key])


def matches(labels: Mapping[str, str], selector: str) -> bool:
    """Equality-based label selectors: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class FakeKubeApi:
    """:class:`KubeApi` in memory. Objects are stored and handed out as deep copies."""

    def __init__(self) -> None:
        self.objects: dict[Key, Json] = {}
        self.events: list[RecordedEvent] = []
        self.calls: list[Call] = []  # the operator's requests, in order
        self._version = 0
        self._uids = 0
        self._faults: list[Fault] = []
        self._hooks: list[Hook] = []
        self._applied: dict[tuple[Key, str], Json] = {}  # last applied manifest per manager

    # -- fault injection ----------------------------------------------------------------------

    def fail_next(
        self,
        verb: str,
        kind: str | None,
        status: int,
        message: str = "injected fault",
        *,
        times: int = 1,
        match: Callable[[Call], bool] | None = None,
    ) -> None:
        """The next ``times`` calls of ``verb`` on ``kind`` (None: any kind) that ``match``
        fail with ``status``: 409 Conflict, 500, 0 for a timeout."""
        self._faults.append(Fault(verb, kind, status, message, times, match))

    def before_next(
        self,
        verb: str,
        kind: str | None,
        action: Callable[[], None],
        *,
        match: Callable[[Call], bool] | None = None,
    ) -> None:
        """Run ``action`` once, just before the next matching call is served."""
        self._hooks.append(Hook(verb, kind, action, match))

    @property
    def pending_faults(self) -> int:
        return sum(f.times for f in self._faults)

    def _enter(self, call: Call) -> None:
        self.calls.append(call)
        for hook in list(self._hooks):
            if _wanted(hook.verb, hook.kind, hook.match, call):
                self._hooks.remove(hook)
                hook.action()
        for fault in self._faults:
            if _wanted(fault.verb, fault.kind, fault.match, call):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                if fault.status == 0:
                    raise ApiError(0, "Timeout", f"{call.verb} {call.kind}: {fault.message}")
                reason = {409: "Conflict", 404: "NotFound", 500: "InternalError"}.get(
                    fault.status, "Injected"
                )
                raise ApiError(fault.status, reason, fault.message)

    # -- bookkeeping ----------------------------------------------------------------------------

    @staticmethod
    def key(api_version: str, kind: str, namespace: str | None, name: str) -> Key:
        return (api_version, kind, "" if kind in CLUSTER_SCOPED else namespace or "", name)

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _store(self, key: Key, obj: Json, before: Json | None) -> Json:
        """Write ``obj`` under ``key`` with a new resourceVersion; generation moves with the
        spec (never with metadata or status)."""
        meta = obj.setdefault("metadata", {})
        meta["name"], meta["resourceVersion"] = key[3], self._next_version()
        if key[2]:
            meta["namespace"] = key[2]
        if before is None:
            self._uids += 1
            meta.setdefault("uid", f"uid-{self._uids}")
            meta["generation"] = 1
            meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        else:
            meta["uid"] = before["metadata"]["uid"]
            generation = before["metadata"].get("generation", 1)
            changed = obj.get("spec") != before.get("spec")
            meta["generation"] = generation + 1 if changed else generation
        obj["apiVersion"], obj["kind"] = key[0], key[1]
        self.objects[key] = obj
        return copy.deepcopy(obj)

    # -- the tests' own writes (a user, kubectl, another controller): no faults, not recorded --

    def create(self, obj: Mapping[str, Any]) -> Json:
        meta = obj["metadata"]
        key = self.key(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f"{key} already exists")
        return self._store(key, copy.deepcopy(dict(obj)), None)

    def edit(
        self, api_version: str, kind: str, namespace: str | None, name: str, patch: Json
    ) -> Json:
        """A user's merge patch (spec, annotations, status: whatever it names)."""
        key = self.key(api_version, kind, namespace, name)
        before = self.objects[key]
        return self._store(key, merge_patch(copy.deepcopy(before), patch), before)

    def remove(self, api_version: str, kind: str, namespace: str | None, name: str) -> None:
        self.objects.pop(self.key(api_version, kind, namespace, name), None)

    def peek(self, api_version: str, kind: str, namespace: str | None, name: str) -> Json | None:
        found = self.objects.get(self.key(api_version, kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def items(
        self, kind: str, namespace: str | None = None, selector: str = "", *, live: bool = False
    ) -> list[Json]:
        """Objects of ``kind``, as copies; ``live`` hands out the stored ones, to read only."""
        return [
            obj if live else copy.deepcopy(obj)
            for (_, k, ns, _), obj in sorted(self.objects.items())
            if k == kind
            and (namespace is None or ns == namespace)
            and matches(obj["metadata"].get("labels") or {}, selector)
        ]

    # -- KubeApi --------------------------------------------------------------------------------

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Json | None:
        self._enter(Call("get", kind, namespace, name))
        return self.peek(api_version, kind, namespace, name)

    def exists(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        self._enter(Call("exists", kind, namespace, name))
        return self.key(api_version, kind, namespace, name) in self.objects

    def events_of(self, namespace: str, kind: str, name: str) -> list[Json]:
        """Events stored as objects (a test's kubelet creates them), by involved object."""
        self._enter(Call("events_of", kind, namespace, name))
        return [
            obj
            for obj in self.items("Event", namespace, "")
            if (obj.get("involvedObject") or {}).get("kind") == kind
            and (obj.get("involvedObject") or {}).get("name") == name
        ]

    def list(
        self, api_version: str, kind: str, namespace: str | None, selector: str = ""
    ) -> list[Json]:
        self._enter(Call("list", kind, namespace or "", "", {"selector": selector}))
        return [
            obj
            for obj in self.items(kind, None if kind in CLUSTER_SCOPED else namespace, selector)
            if obj["apiVersion"] == api_version
        ]

    def apply(self, obj: Mapping[str, Any], field_manager: str = FIELD_MANAGER) -> Json:
        meta = obj["metadata"]
        self._enter(Call("apply", obj["kind"], meta.get("namespace", ""), meta["name"], obj))
        key = self.key(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        applied = copy.deepcopy(dict(obj))
        before = self.objects.get(key)
        if before is None:
            current = applied
        else:
            current = copy.deepcopy(before)
            _prune(current, self._applied.get((key, field_manager), {}), applied)
            current = _merge_applied(current, applied)
        self._applied[(key, field_manager)] = applied
        return self._store(key, current, before)

    def patch_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        resource_version: str | None = None,
    ) -> Json:
        self._enter(Call("patch_status", "ModelDeployment", namespace, name, dict(status)))
        key = self.key(MD_API_VERSION, "ModelDeployment", namespace, name)
        before = self._existing(key)
        _precondition(before, resource_version)
        updated = copy.deepcopy(before)
        updated["status"] = merge_patch(before.get("status") or {}, dict(status))
        return self._store(key, updated, before)

    def set_pod_condition(self, namespace: str, name: str, condition: Mapping[str, Any]) -> Json:
        self._enter(Call("set_pod_condition", "Pod", namespace, name, dict(condition)))
        key = self.key("v1", "Pod", namespace, name)
        before = self._existing(key)
        updated = copy.deepcopy(before)
        status = updated.setdefault("status", {})
        others = [c for c in status.get("conditions", []) if c.get("type") != condition["type"]]
        status["conditions"] = [*others, dict(condition)]
        return self._store(key, updated, before)

    def merge_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        field_manager: str = FIELD_MANAGER,
    ) -> Json:
        self._enter(Call("merge_patch", kind, namespace, name, dict(patch)))
        base, _, sub = kind.partition("/")
        key = self.key(api_version, base, namespace, name)
        before = self._existing(key)
        body = copy.deepcopy(dict(patch))
        meta = body.get("metadata") or {}
        _precondition(before, meta.pop("resourceVersion", None))
        if sub == "scale":
            if base not in SCALABLE:
                raise ApiError(404, "NotFound", f"{kind}: no scale subresource")
            updated = copy.deepcopy(before)
            replicas = (body.get("spec") or {}).get("replicas")
            updated.setdefault("spec", {})["replicas"] = replicas
            stored = self._store(key, updated, before)
            return {
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "metadata": stored["metadata"],
                "spec": {"replicas": replicas},
            }
        if sub:
            raise ApiError(404, "NotFound", f"{kind}: unknown subresource")
        body.pop("status", None)  # the main resource ignores status, as a CRD with /status does
        return self._store(key, merge_patch(before, body), before)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._enter(Call("delete", kind, namespace, name))
        key = self.key(api_version, kind, namespace, name)
        self.objects.pop(key, None)  # like KubernetesApi.delete, a missing object is fine
        for manager in [m for (k, m) in self._applied if k == key]:
            del self._applied[(key, manager)]

    def emit_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> str:
        meta = involved["metadata"]
        self._enter(
            Call("emit_event", "Event", meta["namespace"], meta["name"], {"reason": reason})
        )
        self.events.append(RecordedEvent(involved["kind"], meta["name"], type_, reason, message))
        return f"{meta['name']}.{len(self.events)}"

    def _existing(self, key: Key) -> Json:
        found = self.objects.get(key)
        if found is None:
            raise ApiError(404, "NotFound", f'{key[1]} "{key[3]}" not found')
        return found

    # -- what the operator did --------------------------------------------------------------

    def writes(self, verb: str | None = None, kind: str | None = None) -> builtins.list[Call]:
        mutating = {"apply", "patch_status", "merge_patch", "delete"}
        return [
            c
            for c in self.calls
            if (c.verb == verb if verb else c.verb in mutating) and kind in (None, c.kind)
        ]

    def reasons(self) -> builtins.list[str]:
        return [e.reason for e in self.events]


def _wanted(verb: str, kind: str | None, match: Callable[[Call], bool] | None, call: Call) -> bool:
    return call.verb == verb and kind in (None, call.kind) and (match is None or bool(match(call)))


def _merge_applied(current: Any, applied: Any) -> Any:
    """Server-side apply for one manager: maps merge field by field, lists and scalars are
    the manager's to set whole (our children use no list-map merge keys we rely on)."""
    if isinstance(applied, Mapping) and isinstance(current, Mapping):
        out = dict(current)
        for key, value in applied.items():
            out[key] = _merge_applied(current.get(key), value)
        return out
    return copy.deepcopy(applied)


def _precondition(current: Mapping[str, Any], resource_version: str | None) -> None:
    if resource_version is not None and resource_version != current["metadata"].get(
        "resourceVersion"
    ):
        raise ApiError(
            409,
            "Conflict",
            "Operation cannot be fulfilled: the object has been modified; please apply your"
            " changes to the latest version and try again",
        )


# -- the clock and Prometheus ------------------------------------------------------------------


@dataclass
class FakeClock:
    """``ctx.epoch`` and ``ctx.clock``: time moves only when a test says so."""

    now: float = 1_800_000_000.0

    def epoch(self) -> float:
        return self.now

    def iso(self) -> str:
        return dt.datetime.fromtimestamp(self.now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def advance(self, seconds: float) -> None:
        self.now += seconds


Answer = float | None | Exception


@dataclass
class ScriptedMetrics:
    """``ctx.metrics_provider``: every query is answered by ``answer`` (a number, None for no
    data, or an exception to raise), or by ``script(query)`` when set. Queries are recorded
    with the fake time they were asked at."""

    clock: FakeClock
    answer: Answer = 0.0
    script: Callable[[str], Answer] | None = None
    queries: list[tuple[float, str]] = field(default_factory=list)

    def __call__(self, url: str) -> ScriptedProvider:
        return ScriptedProvider(self)

    vectors: dict[str, dict[str, float]] = field(default_factory=dict)  # by label

    def respond(self, promql: str) -> float | None:
        self.queries.append((self.clock.now, promql))
        answer = self.script(promql) if self.script is not None else self.answer
        if isinstance(answer, Exception):
            raise answer
        return answer

    def asked_at(self) -> list[float]:
        """The distinct times analyses ran at."""
        return sorted({t for t, _ in self.queries})


@dataclass
class ScriptedProvider:
    metrics: ScriptedMetrics

    def query(self, promql: str) -> float | None:
        return self.metrics.respond(promql)

    def query_by(self, promql: str, label: str) -> dict[str, float]:
        self.metrics.queries.append((self.metrics.clock.now, promql))
        if isinstance(self.metrics.answer, Exception):
            raise self.metrics.answer
        return self.metrics.vectors.get(label, {})


# -- the Deployment controller, the garbage collector and the kubelet ----------------------


def template_hash(template: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def is_ready(pod: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def _count(value: Any, replicas: int, round_up: bool) -> int:
    """maxSurge (rounded up) or maxUnavailable (rounded down), an int or a percentage."""
    if isinstance(value, str) and value.endswith("%"):
        exact = replicas * int(value[:-1]) / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value if value is not None else 0)


@dataclass
class DeploymentController:
    """One step of the Deployment controller over the fake's Deployments and Pods.

    Pods carry their Deployment's template labels plus ``pod-template-hash``. A new pod is
    Ready ``ready_after(pod)`` steps after it is created (``never`` for pods that crash: their
    triton container is in CrashLoopBackOff); a pod with readiness gates is Ready only once
    their conditions are True as well (its containers are ready before), as the kubelet
    decides. A rolling update keeps at least
    ``replicas - maxUnavailable`` Ready pods and at most ``replicas + maxSurge`` pods, as the
    real controller does; pods of a Deployment that is gone are garbage-collected. Deployment
    status (replicas, readyReplicas, availableReplicas, updatedReplicas, observedGeneration)
    is written when it changes.
    """

    api: FakeKubeApi
    ready_after: Callable[[Json], int] = field(default=lambda pod: 2)
    crashing: Callable[[Json], bool] = field(default=lambda pod: False)
    _pending: dict[Key, int] = field(default_factory=dict)  # pod -> steps until Ready
    _mounting: set[Key] = field(default_factory=set)  # pods whose Secret volumes are missing
    _serial: int = 0

    def step(self) -> None:
        self._collect_garbage()
        self._kubelet()
        for deployment in self.api.items("Deployment", live=True):
            self._sync(deployment)
            self._sync(deployment)  # what the first pass removed, the second replaces
            self._report(deployment)

    def pods_of(self, namespace: str, name: str) -> list[Json]:
        return [
            p
            for p in self.api.items("Pod", namespace, live=True)
            if (p["metadata"].get("annotations") or {}).get(OWNER_ANNOTATION) == name
        ]

    def _collect_garbage(self) -> None:
        for pod in self.api.items("Pod", live=True):
            owner = (pod["metadata"].get("annotations") or {}).get(OWNER_ANNOTATION)
            if owner and self.api.peek("apps/v1", "Deployment", _ns(pod), owner) is None:
                self._delete_pod(pod)
        for key in [k for k in self._pending if k not in self.api.objects]:
            del self._pending[key]

    def _kubelet(self) -> None:
        for key in list(self._mounting):
            pod = self.api.objects.get(key)
            if pod is None:
                self._mounting.discard(key)
            elif not self._missing_secret(pod):
                self._mounting.discard(key)
                self._pending[key] = self.ready_after(pod)
        for key, left in list(self._pending.items()):
            if left <= 1:
                del self._pending[key]
                pod = self.api.objects[key]
                status = {**_pod_status(True), "podIP": pod["status"].get("podIP")}
                self.api.edit("v1", "Pod", key[2], key[3], {"status": status})
            else:
                self._pending[key] = left - 1
        for pod in self.api.items("Pod", live=True):
            self._gate(pod)

    def _gate(self, pod: Json) -> None:
        """Ready: containers ready and every readiness gate's condition True."""
        gates = [g["conditionType"] for g in (pod.get("spec") or {}).get("readinessGates") or []]
        if not gates:
            return
        conditions = {c["type"]: c.get("status") for c in pod["status"].get("conditions", [])}
        ready = conditions.get("ContainersReady") == "True" and all(
            conditions.get(g) == "True" for g in gates
        )
        if (conditions.get("Ready") == "True") != ready:
            kept = [c for c in pod["status"]["conditions"] if c["type"] != "Ready"]
            flag = {"type": "Ready", "status": "True" if ready else "False"}
            self.api.edit(
                "v1", "Pod", _ns(pod), _name(pod), {"status": {"conditions": [*kept, flag]}}
            )

    def _sync(self, deployment: Json) -> None:
        spec = deployment.get("spec") or {}
        replicas = int(spec.get("replicas") or 0)
        rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
        surge = _count(rolling.get("maxSurge", "25%"), replicas, round_up=True)
        unavailable = _count(rolling.get("maxUnavailable", "25%"), replicas, round_up=False)
        current = template_hash(spec.get("template") or {})
        pods = self.pods_of(_ns(deployment), _name(deployment))
        new = [p for p in pods if p["metadata"]["labels"].get(TEMPLATE_HASH) == current]
        old = [p for p in pods if p not in new]
        while len(new) < replicas and len(pods) < replicas + surge:
            pod = self._create_pod(deployment, current)
            new.append(pod)
            pods.append(pod)
        ready = sum(1 for p in pods if is_ready(p))
        for pod in sorted(old, key=is_ready):  # not-Ready ones first
            if not is_ready(pod) or ready - 1 >= replicas - unavailable:
                ready -= is_ready(pod)
                self._delete_pod(pod)
                pods.remove(pod)
        if len(pods) == len(new):  # nothing old left: scale to the count
            for pod in sorted(new, key=is_ready)[: max(0, len(new) - replicas)]:
                self._delete_pod(pod)

    def _create_pod(self, deployment: Json, current: str) -> Json:
        self._serial += 1
        template = (deployment.get("spec") or {}).get("template") or {}
        labels = {**((template.get("metadata") or {}).get("labels") or {}), TEMPLATE_HASH: current}
        pod: Json = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{_name(deployment)}-{current}-{self._serial}",
                "namespace": _ns(deployment),
                "labels": labels,
                "annotations": {OWNER_ANNOTATION: _name(deployment)},
            },
            "spec": copy.deepcopy(template.get("spec") or {}),
            "status": {**_pod_status(False), "podIP": f"10.0.0.{self._serial}"},
        }
        if self.crashing(pod):
            pod["status"]["containerStatuses"] = [
                {
                    "name": "triton",
                    "ready": False,
                    "restartCount": 3,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                }
            ]
        if missing := self._missing_secret(pod):
            # As the kubelet: no container starts until every volume is set up.
            pod["spec"]["nodeName"] = "gpu-node-1"
            pod["status"] = _pod_status(False)
            pod["status"]["phase"] = "Pending"
            pod["status"]["containerStatuses"] = [
                {"name": "triton", "ready": False, "restartCount": 0, "state": MOUNTING}
            ]
            created = self.api.create(pod)
            key = self.api.key("v1", "Pod", _ns(created), _name(created))
            self._mounting.add(key)
            volume, secret = missing
            message = (
                f'MountVolume.SetUp failed for volume "{volume}" : secret "{secret}" not found'
            )
            self.api.create(
                {
                    "apiVersion": "v1",
                    "kind": "Event",
                    "metadata": {"name": f"{_name(created)}.mount", "namespace": _ns(created)},
                    "involvedObject": {"kind": "Pod", "name": _name(created)},
                    "reason": "FailedMount",
                    "type": "Warning",
                    "message": message,
                }
            )
            return created
        created = self.api.create(pod)
        if self.crashing(created):
            return created  # never Ready
        delay = self.ready_after(created)
        if delay <= 0:
            return self.api.edit(
                "v1", "Pod", _ns(created), _name(created), {"status": _pod_status(True)}
            )
        self._pending[self.api.key("v1", "Pod", _ns(created), _name(created))] = delay
        return created

    def _missing_secret(self, pod: Json) -> tuple[str, str] | None:
        """(volume, Secret) of the first Secret volume whose Secret does not exist."""
        for volume in (pod.get("spec") or {}).get("volumes") or []:
            name = (volume.get("secret") or {}).get("secretName")
            if name and self.api.peek("v1", "Secret", _ns(pod), name) is None:
                return volume["name"], name
        return None

    def _delete_pod(self, pod: Json) -> None:
        self.api.remove("v1", "Pod", _ns(pod), _name(pod))
        self._pending.pop(self.api.key("v1", "Pod", _ns(pod), _name(pod)), None)

    def _report(self, deployment: Json) -> None:
        namespace, name = _ns(deployment), _name(deployment)
        current = template_hash((deployment.get("spec") or {}).get("template") or {})
        pods = self.pods_of(namespace, name)
        ready = sum(1 for p in pods if is_ready(p))
        status = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": len(pods),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "updatedReplicas": sum(
                1 for p in pods if p["metadata"]["labels"].get(TEMPLATE_HASH) == current
            ),
            "unavailableReplicas": len(pods) - ready,
        }
        if deployment.get("status") != status:  # every key is set: the merge replaces it
            self.api.edit("apps/v1", "Deployment", namespace, name, {"status": status})


MOUNTING = {"waiting": {"reason": "ContainerCreating"}}


def _pod_status(ready: bool) -> Json:
    flag = "True" if ready else "False"
    return {
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "ContainersReady", "status": flag},
            {"type": "Ready", "status": flag},
        ],
    }


def _ns(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"].get("namespace", ""))


def _name(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"]["name"])
