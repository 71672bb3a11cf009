"""`modeldeploy-runtime activate`: where requests for a ModelDeployment scaled to zero go.

While a ModelDeployment (MD) with ``spec.autoscaling.scaleToZero.enabled`` has no pods, the
operator points its Service at the activator's pods. The activator then:

1. tells from the request which MD it is for (HTTP: the ``Host``; gRPC: the
   ``x-modeldeploy-target`` metadata, else the model the message names);
2. holds it, a bounded number per MD (``maxHeldRequests``);
3. wakes the MD once, however many requests wait: a JSON patch of its scale subresource from
   0 to ``minReplicas`` (the ``test`` op makes it conditional, so two activator replicas
   never both raise it, and a 422 means someone else already did);
4. waits for the MD's status to list Ready pod addresses (the watch delivers them), and
5. forwards each held request to one of those pods' sidecars, which keys, limits and
   measures it as usual; credentials cross untouched.

A request is never held forever: past the MD's ``wakeTimeout`` (from the wake's start) it
gets 503 with ``retry-after``, as it does when the holding limit is reached or the activator
is shutting down. Health probes are answered here and wake nothing. Inference requests are
counted in ``modeldeploy_runtime_requests_total`` with the MD's labels, so the operator's
idle query sees held requests as traffic.

The decisions (durations, targets, lookups, the per-MD wake state) are pure and take their
clock; the I/O (listeners, forwarding, the patch) is at the bottom.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from modeldeploy_runtime.grpc_proxy import model_and_version, stream_has_error
from modeldeploy_runtime.http1 import (
    ByteBudget,
    ProtocolError,
    Request,
    RequestParser,
    error_response,
    plain,
    release,
    serve_plain,
)
from modeldeploy_runtime.kube import BACKOFF_MAX, BACKOFF_MIN, Changes, Key, KubeApi, Watcher
from modeldeploy_runtime.metrics import LATENCY_BUCKETS, OTHER
from modeldeploy_runtime.proxy import Relay, Upstream, UpstreamError
from modeldeploy_runtime.routes import Kind, Route, grpc_route, http_route
from modeldeploy_runtime.settings import RuntimeSettings

LOG = logging.getLogger("modeldeploy.runtime.activator")

POD_HTTP_PORT = 8080  # the sidecar's ports on every model pod
POD_GRPC_PORT = 8081
TARGET_METADATA = "x-modeldeploy-target"
TRACK = "activator"
DEFAULT_WAKE_TIMEOUT = 600.0
DEFAULT_MAX_HELD = 100
RETRY_SOON = "retry-after: 1"
RETRY_LATER = "retry-after: 30"
# A held request's latency includes the wake: up to the longest sensible wake timeout.
DURATION_BUCKETS = (*LATENCY_BUCKETS, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
WAKE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 900.0)
SERVER_LIVE = b"\x08\x01"  # ServerLiveResponse{live: true}
LINGER_SECONDS = 1.0
GRPC_CODES = {
    400: grpc.StatusCode.FAILED_PRECONDITION,
    404: grpc.StatusCode.NOT_FOUND,
    503: grpc.StatusCode.UNAVAILABLE,
}

# -- durations ------------------------------------------------------------------------------

DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration, as the CRD writes them: "10m", "90s", "1h30m", "500ms"."""
    text = text.strip()
    if text == "0":
        return 0.0
    total, position = 0.0, 0
    for match in DURATION.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * UNITS[match.group(2)]
        position = match.end()
    if not text or position != len(text):
        raise ValueError(f"{text!r} is not a duration like 10m, 90s, 1h30m or 500ms")
    return total


def format_duration(seconds: float) -> str:
    """A duration as Go prints it (``10m0s``, ``1h30m0s``, ``200ms``): what the CRD says."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{int(hours)}h" if hours else ""
    if hours or minutes:
        text += f"{int(minutes)}m"
    return text + f"{round(secs, 6):g}s"


# -- what the activator knows of each ModelDeployment ---------------------------------------


def _int(value: Any, default: int, minimum: int) -> int:
    return (
        value
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        else default
    )


@dataclass(frozen=True)
class Target:
    """The fields of one MD the activator reads (the operator's contract)."""

    namespace: str
    name: str
    model: str = ""
    version: str = ""
    replicas: int = 0
    min_replicas: int = 1
    enabled: bool = False
    wake_timeout: float = DEFAULT_WAKE_TIMEOUT
    max_held: int = DEFAULT_MAX_HELD
    service_ip: str = ""
    addresses: tuple[str, ...] = ()

    @property
    def key(self) -> Key:
        return self.namespace, self.name

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def from_md(cls, md: Mapping[str, Any]) -> Target:
        """Tolerant of what a hand-written MD may hold: a bad value is its default (the
        operator's validation reports it; the activator must go on serving the others)."""
        metadata = md.get("metadata") or {}
        spec = md.get("spec") or {}
        model = spec.get("model") or {}
        autoscaling = spec.get("autoscaling") or {}
        zero = autoscaling.get("scaleToZero") or {}
        activation = (md.get("status") or {}).get("activation") or {}
        try:
            wake_timeout = parse_duration(str(zero.get("wakeTimeout") or "10m"))
        except ValueError:
            wake_timeout = DEFAULT_WAKE_TIMEOUT
        addresses = activation.get("addresses") or []
        return cls(
            namespace=str(metadata.get("namespace") or ""),
            name=str(metadata.get("name") or ""),
            model=str(model.get("name") or ""),
            version=str(model.get("version") or ""),
            replicas=_int(spec.get("replicas"), 0, 0),
            min_replicas=_int(autoscaling.get("minReplicas"), 1, 1),
            enabled=zero.get("enabled") is True,
            wake_timeout=wake_timeout or DEFAULT_WAKE_TIMEOUT,
            max_held=_int(zero.get("maxHeldRequests"), DEFAULT_MAX_HELD, 0),
            service_ip=str(activation.get("serviceIP") or ""),
            addresses=tuple(str(a) for a in addresses if isinstance(a, str) and a),
        )


def unknown(message: str) -> ProtocolError:
    return ProtocolError(404, "unknown", message)


def ambiguous(message: str) -> ProtocolError:
    return ProtocolError(400, "ambiguous", message)


def queue_full(target: Target) -> ProtocolError:
    return ProtocolError(
        503,
        "queue_full",
        f"{target.label} is waking up and already holds {target.max_held} requests"
        " (spec.autoscaling.scaleToZero.maxHeldRequests): retry shortly",
        (RETRY_SOON,),
    )


def wake_timed_out(target: Target) -> ProtocolError:
    return ProtocolError(
        503,
        "wake_timeout",
        f"{target.label} did not become ready within {format_duration(target.wake_timeout)}"
        f" of waking: kubectl describe modeldeployment -n {target.namespace} {target.name}"
        " says why",
        (RETRY_LATER,),
    )


def shutting_down() -> ProtocolError:
    return ProtocolError(503, "shutting_down", "activator shutting down: retry", (RETRY_SOON,))


def scaled_to_zero(target: Target) -> ProtocolError:
    return ProtocolError(
        503,
        "scaled_to_zero",
        f"{target.label} is scaled to zero: an inference request wakes it",
    )


def host_name(host: str) -> str:
    """The Host header without its port (an IPv6 literal without its brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.rstrip(".")


class Directory:
    """The MDs as the watch last reported them, and the lookups that find a request's MD."""

    def __init__(self) -> None:
        self._targets: dict[Key, Target] = {}
        self.listed = False  # the first list arrived: lookups can be trusted

    def apply(self, changes: Mapping[Key, Mapping[str, Any] | None]) -> list[Key]:
        """The watch's changes in; the keys whose target changed."""
        changed = []
        for key, md in changes.items():
            before = self._targets.get(key)
            if md is None:
                self._targets.pop(key, None)
            else:
                self._targets[key] = Target.from_md(md)
            if self._targets.get(key) != before:
                changed.append(key)
        self.listed = True
        return changed

    def get(self, key: Key) -> Target | None:
        return self._targets.get(key)

    def addresses(self) -> set[str]:
        return {a for t in self._targets.values() for a in t.addresses}

    def by_host(self, host: str) -> Target:
        """``iris.ns.svc.cluster.local``, ``iris.ns``, ``iris`` (if only one namespace has a
        scale-to-zero ``iris``), or the MD Service's ClusterIP."""
        name = host_name(host)
        if not name:
            raise unknown("the request has no Host header: it names no ModelDeployment")
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            labels = name.split(".")
            return self.by_name(labels[0], labels[1] if len(labels) > 1 else None)
        for target in self._targets.values():
            if target.enabled and target.service_ip and _same_ip(target.service_ip, address):
                return target
        raise unknown(f"no ModelDeployment that scales to zero has the Service IP {name}")

    def by_name(self, name: str, namespace: str | None) -> Target:
        if namespace is not None:
            target = self._targets.get((namespace, name))
            if target is None:
                raise unknown(f"no ModelDeployment {namespace}/{name}")
            if not target.enabled:
                raise unknown(
                    f"{target.label} does not scale to zero"
                    " (spec.autoscaling.scaleToZero.enabled): the activator does not serve it"
                )
            return target
        found = sorted(
            (t for t in self._targets.values() if t.enabled and t.name == name),
            key=lambda t: t.namespace,
        )
        if len(found) > 1:
            namespaces = ", ".join(t.namespace for t in found)
            raise ambiguous(
                f"ModelDeployments named {name} scale to zero in several namespaces"
                f" ({namespaces}): use <name>.<namespace> as the host,"
                f" e.g. {name}.{found[0].namespace}"
            )
        if not found:
            raise unknown(f"no ModelDeployment named {name} scales to zero")
        return found[0]

    def by_metadata(self, value: str) -> Target:
        """gRPC's ``x-modeldeploy-target: name.namespace``."""
        name, _, namespace = value.strip().partition(".")
        return self.by_name(name, namespace.split(".")[0] if namespace else None)

    def by_model(self, model: str) -> Target:
        """The scale-to-zero MD serving ``model`` (``spec.model.name``), when only one does."""
        hint = f"send metadata {TARGET_METADATA}: <name>.<namespace>"
        if not model:
            raise unknown(f"the request names no model: {hint}")
        found = [t for t in self._targets.values() if t.enabled and t.model == model]
        if len(found) > 1:
            raise ambiguous(f"several ModelDeployments serve model {model}: {hint}")
        if not found:
            raise unknown(f"no ModelDeployment that scales to zero serves model {model}")
        return found[0]


def _same_ip(text: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(text) == address
    except ValueError:
        return False


@dataclass
class Wake:
    """One MD's held requests and the wake they share; state only, decided by the caller's
    clock.

    A wake starts with the first request held while the MD has no addresses and lasts its
    ``wakeTimeout``. A request held after the MD was ready meanwhile (it went back to zero),
    or after the timeout passed, starts a new one: a wake that failed is tried again by the
    next request, not refused forever."""

    held: int = 0
    generation: int = 0
    started: float | None = None
    deadline: float = 0.0
    patched: bool = False  # this wake's scale patch was made (or found unneeded)
    ready_seen: bool = False  # addresses appeared since it started
    unanswered: bool = False  # no answer forwarded for it yet (wake_seconds)

    def join(self, now: float, target: Target) -> tuple[int, float]:
        """Hold one more request: its wake's generation and deadline; queue_full past the
        MD's limit."""
        if self.held >= target.max_held:
            raise queue_full(target)
        if self.started is None or self.ready_seen or now >= self.deadline:
            self.generation += 1
            self.started = now
            self.deadline = now + target.wake_timeout
            self.patched = self.ready_seen = False
            self.unanswered = True
        self.held += 1
        return self.generation, self.deadline

    def leave(self) -> None:
        self.held -= 1

    def ready(self) -> None:
        if self.started is not None:
            self.ready_seen = True

    def answered(self, generation: int, now: float) -> float | None:
        """Seconds from the wake's start to its first answer; None for every later one."""
        if generation != self.generation or not self.unanswered or self.started is None:
            return None
        self.unanswered = False
        return now - self.started


@dataclass(frozen=True)
class Admission:
    """A request let through: the target (with addresses) and the wake it waited for."""

    target: Target
    generation: int | None = None  # None: it was never held


def model_labels(target: Target, model: str, version: str) -> tuple[str, str]:
    """Bounded like the sidecar's: the MD's own model, or ``other``."""
    if not target.model or model != target.model:
        return OTHER, OTHER
    if target.version and version not in ("", target.version):
        return model, OTHER
    return model, version or target.version


class ActivatorMetrics:
    """The activator's series, in a registry of its own; every one carries the MD's
    namespace and name (Prometheus keeps them: honor_labels)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        md = ["namespace", "modeldeployment"]
        request = [*md, "model", "version", "track"]
        self.requests = Counter(
            "modeldeploy_runtime_requests_total",
            "Inference requests for a ModelDeployment at zero, by HTTP status or gRPC code.",
            [*request, "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "modeldeploy_runtime_request_duration_seconds",
            "Inference request latency through the activator, the wake included.",
            request,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.held = Gauge(
            "modeldeploy_activator_held_requests",
            "Requests held until their ModelDeployment wakes.",
            md,
            registry=self.registry,
        )
        self.wakeups = Counter(
            "modeldeploy_activator_wakeups_total",
            "Scale patches this activator made that raised a ModelDeployment from zero.",
            md,
            registry=self.registry,
        )
        self.wake_errors = Counter(
            "modeldeploy_activator_wake_errors_total",
            "Scale patches that failed (retried until the wake timeout).",
            md,
            registry=self.registry,
        )
        self.wake_seconds = Histogram(
            "modeldeploy_activator_wake_seconds",
            "From the first request held by a wake to the first answer forwarded for it.",
            md,
            buckets=WAKE_BUCKETS,
            registry=self.registry,
        )
        self.refused = Counter(
            "modeldeploy_activator_refused_total",
            "Requests the activator refused: queue_full, wake_timeout, shutting_down, unknown,"
            " ambiguous.",
            [*md, "reason"],
            registry=self.registry,
        )

    def observe(
        self, target: Target, model: str, version: str, code: str, elapsed: float | None
    ) -> None:
        labels = (target.namespace, target.name, *model_labels(target, model, version), TRACK)
        self.requests.labels(*labels, code).inc()
        if elapsed is not None:
            self.duration.labels(*labels).observe(elapsed)


Patch = Callable[[Target], Awaitable[bool]]  # True: this call raised the scale


class Activator:
    """Holding, waking and releasing, on the event loop. ``patch`` raises an MD's scale
    (True when it did, False when it was no longer zero); ``clock`` and ``sleep`` are
    injectable so tests need no real waiting."""

    def __init__(
        self,
        directory: Directory,
        patch: Patch,
        metrics: ActivatorMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.directory = directory
        self.metrics = metrics
        self._patch = patch
        self._clock = clock
        self._sleep = sleep
        self.wakes: dict[Key, Wake] = {}
        self._changed: dict[Key, asyncio.Event] = {}
        self._waking: dict[Key, asyncio.Task[None]] = {}
        self._turn: dict[Key, int] = {}
        self._closing = asyncio.Event()
        self.draining = False
        self.busy = 0  # requests being held or forwarded
        self._idle = asyncio.Event()
        self._idle.set()

    # -- the watch's side -------------------------------------------------------------------

    def update(self, changes: Changes) -> None:
        """The watch's changes (on the loop): held requests look again."""
        for key in self.directory.apply(changes):
            target = self.directory.get(key)
            if target is None:
                with contextlib.suppress(KeyError):
                    self.metrics.held.remove(*key)
            elif target.addresses and key in self.wakes:
                self.wakes[key].ready()
            self._notify(key)

    def _notify(self, key: Key) -> None:
        event = self._changed.pop(key, None)
        if event is not None:
            event.set()

    # -- finding the target -----------------------------------------------------------------

    def _resolved(self, find: Callable[[], Target]) -> Target:
        try:
            if not self.directory.listed:  # not "unknown": the watch has not said yet
                raise ProtocolError(
                    503,
                    "unknown",
                    "the activator has not listed the ModelDeployments yet: retry",
                    (RETRY_SOON,),
                )
            return find()
        except ProtocolError as refused:
            # No MD's labels for an unknown name (any Host header would mint a series).
            self.metrics.refused.labels("", "", refused.reason).inc()
            raise

    def by_host(self, host: str) -> Target:
        return self._resolved(lambda: self.directory.by_host(host))

    def for_grpc(self, named: str | None, model: str) -> Target:
        if named:
            return self._resolved(lambda: self.directory.by_metadata(named))
        return self._resolved(lambda: self.directory.by_model(model))

    def current(self, target: Target) -> Target:
        return self.directory.get(target.key) or target

    def rotation(self, target: Target) -> list[str]:
        """The target's addresses, starting one further each call (round-robin)."""
        addresses = list(target.addresses)
        if not addresses:
            return []
        turn = self._turn.get(target.key, 0)
        self._turn[target.key] = turn + 1
        start = turn % len(addresses)
        return addresses[start:] + addresses[:start]

    # -- holding ----------------------------------------------------------------------------

    def refuse(self, target: Target, refused: ProtocolError) -> ProtocolError:
        self.metrics.refused.labels(target.namespace, target.name, refused.reason).inc()
        return refused

    async def admit(self, target: Target) -> Admission:
        """The target once it has addresses: at once, or after holding the request while it
        wakes. A ProtocolError (503 with retry-after) when it cannot be held or does not
        wake in time, or the activator is closing."""
        current = self.current(target)
        if current.addresses:
            return Admission(current)
        if self.draining:
            raise self.refuse(current, shutting_down())
        key = current.key
        wake = self.wakes.setdefault(key, Wake())
        try:
            generation, deadline = wake.join(self._clock(), current)
        except ProtocolError as refused:
            raise self.refuse(current, refused) from None
        held = self.metrics.held.labels(*key)
        held.inc()
        try:
            self._start_waking(key)
            while True:
                found = self.directory.get(key)
                if found is None:
                    raise self.refuse(current, unknown(f"{current.label} was deleted"))
                current = found
                if current.addresses:
                    return Admission(current, generation)
                if self._closing.is_set():
                    raise self.refuse(current, shutting_down())
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise self.refuse(current, wake_timed_out(current))
                changed = self._changed.setdefault(key, asyncio.Event())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await changed.wait()
        finally:
            wake.leave()
            held.dec()

    def answered(self, admission: Admission) -> None:
        """A forwarded answer went out: the first of a wake measures it."""
        if admission.generation is None:
            return
        wake = self.wakes.get(admission.target.key)
        seconds = wake.answered(admission.generation, self._clock()) if wake else None
        if seconds is not None:
            self.metrics.wake_seconds.labels(*admission.target.key).observe(seconds)

    # -- waking -----------------------------------------------------------------------------

    def _start_waking(self, key: Key) -> None:
        """One patch in flight per MD, however many requests wait."""
        if key in self._waking or self.wakes[key].patched:
            return
        task = asyncio.create_task(self._wake_up(key))
        self._waking[key] = task
        task.add_done_callback(lambda _: self._waking.pop(key, None))

    async def _wake_up(self, key: Key) -> None:
        """Patch the scale, retried with backoff while the wake lasts and someone waits;
        never when the MD already has replicas or addresses."""
        delay = BACKOFF_MIN
        while True:
            wake = self.wakes[key]
            target = self.directory.get(key)
            if target is None or target.addresses or target.replicas > 0 or wake.patched:
                wake.patched = True
                return
            if wake.held <= 0 or self._closing.is_set() or self._clock() >= wake.deadline:
                return
            try:
                raised = await self._patch(target)
            except Exception as error:  # the API server's or the network's: retried
                self.metrics.wake_errors.labels(*key).inc()
                LOG.warning("waking %s failed (retrying in %gs): %s", target.label, delay, error)
                await self._sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            wake.patched = True
            if raised:
                self.metrics.wakeups.labels(*key).inc()
                LOG.info("woke %s: scale 0 -> %d", target.label, target.min_replicas)
            else:
                LOG.info("%s was already woken (its scale was no longer 0)", target.label)
            return

    # -- shutting down ----------------------------------------------------------------------

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """Counts a request being held or forwarded, for the shutdown's grace."""
        self.busy += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.busy -= 1
            if self.busy == 0:
                self._idle.set()

    async def settled(self, timeout: float) -> bool:
        """True once no request is held or forwarded, False after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def drain(self) -> None:
        """No new holding: what would be held is refused (the other replica takes it)."""
        self.draining = True

    def close(self) -> None:
        """The grace is over: every held request is refused now."""
        self.draining = True
        self._closing.set()
        for key in list(self._changed):
            self._notify(key)
        for task in self._waking.values():
            task.cancel()


# -- HTTP -------------------------------------------------------------------------------------


@dataclass
class Resolved:
    """What ``admit`` decided from the head: the route, and the target (None: liveness)."""

    route: Route
    target: Target | None


class ActivatorHttp:
    """The HTTP listener: the sidecar's strict parser, then hold, wake, forward (proxy.py's
    Upstream and Relay, one keep-alive connection per pod address and client connection)."""

    def __init__(
        self, settings: RuntimeSettings, activator: Activator, *, pod_port: int = POD_HTTP_PORT
    ) -> None:
        self.settings = settings
        self.activator = activator
        self.pod_port = pod_port
        self.budget = ByteBudget(settings.max_buffered_bytes)
        self.connections: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.connections) >= self.settings.max_connections:
            writer.write(
                error_response(503, "too many connections", close=True, extra=(RETRY_SOON,))
            )
            writer.close()
            return
        self.connections.add(writer)
        settings = self.settings
        parser = RequestParser(
            self._admit,
            max_body=settings.max_body_bytes,
            budget=self.budget,
            header_timeout=settings.header_timeout_seconds,
            body_timeout=settings.client_timeout_seconds,
            idle_timeout=settings.idle_timeout_seconds,
        )
        upstreams: dict[str, Upstream] = {}
        try:
            while (request := await parser.next(reader, writer)) is not None:
                try:
                    with self.activator.working():
                        keep = await self._serve(writer, request, upstreams)
                finally:
                    release(request, self.budget)
                if not keep or self.activator.draining:
                    break
        except ProtocolError as error:
            await self._reject(reader, writer, error)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            parser.close()
            for upstream in upstreams.values():
                upstream.close()
            writer.close()
            self.connections.discard(writer)

    def close_all(self) -> None:
        """Shutting down: idle kept-alive connections end now."""
        for writer in list(self.connections):
            writer.close()

    def _admit(self, request: Request) -> None:
        """At the end of the head: the route (404/405 as the sidecar answers) and the MD."""
        route = http_route(request.method, request.path)
        target = None
        if not (route.kind is Kind.HEALTH and request.path == "/v2/health/live"):
            host = (request.header(b"host") or b"").decode("latin-1")
            target = self.activator.by_host(host)
        request.route = Resolved(route, target)

    async def _serve(
        self, writer: asyncio.StreamWriter, request: Request, upstreams: dict[str, Upstream]
    ) -> bool:
        """Answer one request; False when the connection should close."""
        resolved = cast(Resolved, request.route)
        route, target = resolved.route, resolved.target
        if target is None:  # liveness: the activator's own
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
            writer.write(b"content-length: 2\r\n\r\n{}")
            await writer.drain()
            return request.keep_alive
        measured = route.kind is Kind.INFER
        try:
            if route.kind is Kind.HEALTH:  # readiness: forwarded only when it has pods
                admission = Admission(self.activator.current(target))
                if not admission.target.addresses:
                    raise scaled_to_zero(admission.target)
            else:
                admission = await self.activator.admit(target)
        except ProtocolError as refused:
            writer.write(error_response(refused.status, refused.message, extra=refused.headers))
            await writer.drain()
            if measured:
                self._observe(request, route, target, str(refused.status))
            return request.keep_alive
        relay = Relay(writer, http10=request.http10, keep=False)
        try:
            await self._forward(request, admission.target, relay, upstreams)
            code = str(relay.status)
        except UpstreamError as error:
            if relay.started:  # the answer is cut short: only closing can say so
                return False
            writer.write(error_response(error.status, error.message))
            code = str(error.status)
        await writer.drain()
        self.activator.answered(admission)
        if measured:
            self._observe(request, route, admission.target, code)
        return request.keep_alive and not relay.close_client

    async def _forward(
        self, request: Request, target: Target, relay: Relay, upstreams: dict[str, Upstream]
    ) -> None:
        """To one of the pods, the next on a connect failure (the addresses may have just
        changed)."""
        failure = UpstreamError(502, "connect", f"{target.label} has no pod address")
        for address in self.activator.rotation(target):
            upstream = upstreams.get(address)
            if upstream is None:
                upstream = Upstream(
                    self.settings,
                    (address, self.pod_port),
                    self.settings.upstream_timeout_seconds,
                )
                upstreams[address] = upstream
            try:
                await upstream.exchange(request, relay)
                return
            except UpstreamError as error:
                if error.reason != "connect" or relay.started:
                    raise
                failure = UpstreamError(
                    502, "connect", f"cannot reach {target.label}'s pod {address}: {error}"
                )
        raise failure

    def _observe(self, request: Request, route: Route, target: Target, code: str) -> None:
        elapsed = time.perf_counter() - request.received
        self.activator.metrics.observe(target, route.model, route.version, code, elapsed)

    async def _reject(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: ProtocolError
    ) -> None:
        """Refused from the head (no such route or MD): answered, then closed, reading what
        the client still sends for a moment so the answer is not lost to a reset."""
        writer.write(error_response(error.status, error.message, close=True, extra=error.headers))
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(LINGER_SECONDS):
                while await reader.read(65536):
                    pass


# -- gRPC -------------------------------------------------------------------------------------


async def grpc_refuse(context: grpc.aio.ServicerContext, refused: ProtocolError) -> None:
    """A refusal as gRPC says it: NOT_FOUND, FAILED_PRECONDITION (ambiguous) or UNAVAILABLE
    with ``retry-after`` in the trailing metadata."""
    context.set_trailing_metadata(tuple(tuple(h.split(": ", 1)) for h in refused.headers))
    code = GRPC_CODES.get(refused.status, grpc.StatusCode.UNAVAILABLE)
    await context.abort(code, refused.message)


class ActivatorGrpc(grpc.GenericRpcHandler):  # type: ignore[misc] # grpc has no stubs
    """The gRPC listener: every method as raw bytes, the MD found from the metadata or the
    message's model name (python's grpc cannot read ``:authority``)."""

    def __init__(
        self, settings: RuntimeSettings, activator: Activator, *, pod_port: int = POD_GRPC_PORT
    ) -> None:
        self.settings = settings
        self.activator = activator
        self.pod_port = pod_port
        self._channels: dict[str, grpc.aio.Channel] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        route = grpc_route(method)
        if route is None:
            return None
        if route.action == "ServerLive":
            return grpc.unary_unary_rpc_method_handler(self._live)
        named = next(
            (
                str(v)
                for k, v in handler_call_details.invocation_metadata or ()
                if k == TARGET_METADATA
            ),
            None,
        )
        if route.action == "ModelStreamInfer":
            return grpc.stream_stream_rpc_method_handler(self._stream(method, named))
        return grpc.unary_unary_rpc_method_handler(self._unary(method, route, named))

    async def _live(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return SERVER_LIVE

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            self._prune()
            channel = grpc.aio.insecure_channel(
                f"{address}:{self.pod_port}",
                options=[
                    ("grpc.max_send_message_length", -1),
                    ("grpc.max_receive_message_length", -1),
                ],
            )
            self._channels[address] = channel
        return channel

    def _prune(self) -> None:
        """Channels to pods no MD lists any more are closed (pod IPs come and go)."""
        live = self.activator.directory.addresses()
        for address in [a for a in self._channels if a not in live]:
            channel = self._channels.pop(address)
            asyncio.get_running_loop().create_task(channel.close())

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    @staticmethod
    def _metadata(context: grpc.aio.ServicerContext) -> list[tuple[str, Any]]:
        """The caller's metadata, credentials included (the sidecar checks them)."""
        return [
            (k, v)
            for k, v in context.invocation_metadata() or ()
            if k != TARGET_METADATA and not k.startswith(":")
        ]

    async def _admitted(
        self,
        route: Route,
        named: str | None,
        model: str,
        version: str,
        context: grpc.aio.ServicerContext,
    ) -> tuple[Target, Admission]:
        """The target and its admission; the call aborted when refused."""
        try:
            target = self.activator.for_grpc(named, model)
        except ProtocolError as refused:
            await grpc_refuse(context, refused)
            raise
        try:
            if route.kind is Kind.HEALTH:  # ServerReady: forwarded only when it has pods
                admission = Admission(self.activator.current(target))
                if not admission.target.addresses:
                    raise scaled_to_zero(admission.target)
                return target, admission
            return target, await self.activator.admit(target)
        except ProtocolError as refused:
            if route.kind is Kind.INFER:
                code = GRPC_CODES.get(refused.status, grpc.StatusCode.UNAVAILABLE).name
                self.activator.metrics.observe(target, model, version, code, None)
            await grpc_refuse(context, refused)
            raise

    def _unary(
        self, method: str, route: Route, named: str | None
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            started = time.perf_counter()
            model, version = model_and_version(request)
            with self.activator.working():
                target, admission = await self._admitted(route, named, model, version, context)
                code = "OK"
                try:
                    answer = await self._call(method, request, admission.target, context)
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                    await context.abort(error.code(), error.details() or "")
                    raise
                finally:
                    self.activator.answered(admission)
                    if route.kind is Kind.INFER:
                        elapsed = time.perf_counter() - started
                        self.activator.metrics.observe(target, model, version, code, elapsed)
                return answer

        return handle

    async def _call(
        self, method: str, request: bytes, target: Target, context: grpc.aio.ServicerContext
    ) -> bytes:
        """To one of the pods; the next when one cannot be reached."""
        failure: grpc.aio.AioRpcError | None = None
        for address in self.activator.rotation(target):
            forward = self._channel(address).unary_unary(
                method, request_serializer=None, response_deserializer=None
            )
            try:
                answer = await forward(
                    request,
                    metadata=self._metadata(context),
                    timeout=self.settings.upstream_timeout_seconds,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                failure = error
                continue
            return bytes(answer)
        if failure is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{target.label} has no pod address")
        raise cast(grpc.aio.AioRpcError, failure)

    def _stream(
        self, method: str, named: str | None
    ) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        """ModelStreamInfer: held on its first message (which names the model), then the
        whole stream goes to one pod."""
        route = Route(Kind.INFER, action="ModelStreamInfer")

        async def handle(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            opening = await anext(aiter(requests), None)
            if opening is None:
                return
            started = time.perf_counter()
            model, version = model_and_version(opening)
            with self.activator.working():
                target, admission = await self._admitted(route, named, model, version, context)
                addresses = self.activator.rotation(admission.target)

                async def messages() -> AsyncIterator[bytes]:
                    yield opening
                    async for message in requests:
                        yield message

                forward = self._channel(addresses[0]).stream_stream(
                    method, request_serializer=None, response_deserializer=None
                )
                call = forward(messages(), metadata=self._metadata(context))
                metrics = self.activator.metrics
                first = True  # the first answer: the wake's, and the only one with a latency
                try:
                    async for response in call:
                        answer = bytes(response)
                        code = "INTERNAL" if stream_has_error(answer) else "OK"
                        # Each answer is one request; only the first's latency is known here
                        # (the later messages are not held).
                        elapsed = time.perf_counter() - started if first else None
                        metrics.observe(target, model, version, code, elapsed)
                        if first:
                            self.activator.answered(admission)
                            first = False
                        yield answer
                except grpc.aio.AioRpcError as error:
                    await context.abort(error.code(), error.details() or "")

        return handle


# -- the metrics listener and the command ------------------------------------------------------


class ActivatorAdmin:
    """``/metrics``, and ``/healthz``: 200 once the first list of MDs arrived (before it,
    every request would be refused as unknown) and until the activator drains."""

    def __init__(self, activator: Activator) -> None:
        self.metrics = activator.metrics
        self.directory = activator.directory
        self.activator = activator
        self.budget = ByteBudget(1 << 20)

    async def answer(self, path: str) -> bytes:
        if path == "/metrics":
            return plain(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            if self.activator.draining:
                return plain(503, b"shutting down")
            if self.directory.listed:
                return plain(200, b"ok")
            return plain(503, b"ModelDeployments not listed yet")
        return plain(404, b"not found")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_plain(
            reader,
            writer,
            self.answer,
            self.budget,
            header_timeout=10.0,
            body_timeout=10.0,
            idle_timeout=60.0,
        )


@dataclass(frozen=True)
class ActivatorOptions:
    """``modeldeploy-runtime activate``'s flags."""

    http_port: int = 8080
    grpc_port: int = 8081
    metrics_port: int = 9090
    namespace: str | None = None
    api_url: str | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    grace_seconds: float = 20.0
    upstream_timeout_seconds: float = 60.0
    bind_address: str = "0.0.0.0"  # noqa: S104 - a Service's pods listen on every address
    pod_http_port: int = POD_HTTP_PORT
    pod_grpc_port: int = POD_GRPC_PORT


def scale_patch(api: KubeApi) -> Patch:
    """The wake: the blocking PATCH in a worker thread."""

    async def patch(target: Target) -> bool:
        return await asyncio.to_thread(
            api.patch_scale, target.namespace, target.name, target.min_replicas
        )

    return patch


async def activate(
    options: ActivatorOptions, *, api: KubeApi | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``), then drain: no new listeners' connections,
    held and forwarded requests get ``grace_seconds`` to finish, those still held are
    refused with a retryable 503."""
    settings = RuntimeSettings.model_validate(
        {
            "bind_address": options.bind_address,
            "http_port": options.http_port,
            "grpc_port": options.grpc_port,
            "metrics_port": options.metrics_port,
            "upstream_timeout_seconds": options.upstream_timeout_seconds,
        }
    )
    api = api or KubeApi.configured(options.api_url, options.token_file, options.ca_file)
    metrics = ActivatorMetrics()
    directory = Directory()
    activator = Activator(directory, scale_patch(api), metrics)
    loop = asyncio.get_running_loop()
    watcher = Watcher(api, activator.update, namespace=options.namespace, loop=loop)
    watcher.start()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    front = ActivatorHttp(settings, activator, pod_port=options.pod_http_port)
    admin = ActivatorAdmin(activator)
    listener = await asyncio.start_server(front.handle, settings.bind_address, settings.http_port)
    admin_listener = await asyncio.start_server(
        admin.handle, settings.bind_address, settings.metrics_port
    )
    handler = ActivatorGrpc(settings, activator, pod_port=options.pod_grpc_port)
    grpc_server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
        ]
    )
    grpc_server.add_generic_rpc_handlers([handler])
    grpc_server.add_insecure_port(f"{settings.bind_address}:{settings.grpc_port}")
    await grpc_server.start()
    LOG.info(
        "Activating: HTTP on :%d, gRPC on :%d, metrics on :%d; ModelDeployments %s",
        settings.http_port,
        settings.grpc_port,
        settings.metrics_port,
        f"in {options.namespace}" if options.namespace else "in every namespace",
    )
    try:
        await stop.wait()
    finally:
        LOG.info("draining for up to %gs", options.grace_seconds)
        activator.drain()
        listener.close()
        # Refuses new calls at once; held ones are refused (below) well before it cancels.
        grpc_stopped = asyncio.create_task(grpc_server.stop(options.grace_seconds + 5))
        if not await activator.settled(options.grace_seconds):
            LOG.info("%d requests still held or forwarded: refusing them", activator.busy)
        activator.close()
        await activator.settled(2.0)
        front.close_all()
        await grpc_stopped
        await handler.close()
        admin_listener.close()
        watcher.stop()
