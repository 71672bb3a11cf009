"""Shadow traffic: a sample of stable's requests copied to a canary, its answers compared with
stable's, output against output, on the same input.

During a shadow step of a rollout the operator writes ``<name>-shadow`` (a ConfigMap mounted
into every sidecar): the canary's revision, the percentage to copy and the canary pods'
addresses. The stable sidecars read it (:class:`ShadowFile`), and for a sampled inference
call that stable answered with 200, hand a copy to :class:`Mirror` *after* the user has the
answer. The mirror's queue is bounded and drops rather than waits, its workers send the copy
to a canary pod's sidecar (the canary's only door: keys and limits apply, the caller's key
goes with it), and compare the two answers per named output (:func:`compare`):

- classification outputs (floating point of width two or more: the top-1 class and the
  top-k overlap; integer labels: equality) count disagreeing rows;
- every numeric output measures the mean absolute error and the relative L1 error per row,
  and the population stability index between the two answers' distributions over a window;
- the same request's latency on both sides, and the canary's failures on inputs stable
  answered (errors and timeouts, apart from an unreachable address or a refusal by its door).

Labels are bounded: the canary's revision (metrics restart with each) and output names (the
first 16 seen; later ones share ``other``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from modeldeploy_runtime.drift import (
    Array,
    DecodeError,
    decode_grpc,
    decode_tensors,
    psi,
    split_binary,
)
from modeldeploy_runtime.http1 import Request
from modeldeploy_runtime.metrics import LATENCY_BUCKETS, OTHER

LOG = logging.getLogger("modeldeploy.runtime.shadow")
# On copies: a token only the ModelDeployment's own sidecars can make (copy_token), so the
# canary's door lets a copy past the caller's rate limit and query budget (the caller's
# request already counted at stable's door), and nobody else can claim to be one.
MIRROR_HEADER = b"x-modeldeploy-mirror"
MAX_OUTPUT_LABELS = 16
TOP_K = 5
PSI_BINS = 10
FLOATS = {"FP16", "FP32", "FP64", "BF16"}
INTEGERS = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
# The canary's door said no (a key it does not accept, a limit): not the model's failure.
REFUSED = {401, 403, 429}
INLINE_BYTES = 64 * 1024  # answers up to this are compared on the event loop
UNREACHABLE_SECONDS = 1.0  # after a failed connect, copies to that address count, unsent


@dataclass(frozen=True)
class ShadowConfig:
    """What ``<name>-shadow`` says: copy ``percent`` of requests to ``targets``."""

    revision: str
    version: str
    percent: float
    targets: tuple[tuple[str, int], ...]  # the canary pods' sidecars, HTTP
    grpc_targets: tuple[tuple[str, int], ...] = ()  # and gRPC

    @classmethod
    def parse(cls, text: str) -> ShadowConfig | None:
        """None for an empty document (no shadow step runs); ValueError when malformed."""
        if not text.strip():
            return None
        data = json.loads(text)
        if not data:
            return None
        percent = float(data.get("percent", 0))
        if not 0 <= percent <= 100:
            raise ValueError(f"percent {percent} is outside [0, 100]")
        return cls(
            str(data["revision"]),
            str(data.get("version", "")),
            percent,
            _addresses(data.get("targets")),
            _addresses(data.get("grpcTargets")),
        )


def _addresses(listed: Any) -> tuple[tuple[str, int], ...]:
    out = []
    for target in listed or []:
        host, _, port = str(target).rpartition(":")
        out.append((host, int(port)))
    return tuple(out)


class ShadowFile:
    """The mounted config, re-read when it changes, looked at no more than once a second (a
    stat on the request path, not a read)."""

    def __init__(
        self, path: Path, clock: Callable[[], float] = time.monotonic, interval: float = 1.0
    ) -> None:
        self._path = path
        self._clock = clock
        self._interval = interval
        self._checked = -math.inf
        self._stamp: tuple[int, int] | None = None
        self._config: ShadowConfig | None = None

    def current(self) -> ShadowConfig | None:
        now = self._clock()
        if now - self._checked < self._interval:
            return self._config
        self._checked = now
        try:
            stat = self._path.stat()
        except OSError:
            self._stamp, self._config = None, None  # no shadow step: the volume is empty
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._config = ShadowConfig.parse(self._path.read_text())
            except (OSError, ValueError, KeyError) as error:
                LOG.warning("ignoring %s: %s", self._path, error)
                self._config = None
        return self._config


# -- comparing two answers --------------------------------------------------------------------


@dataclass(frozen=True)
class OutputDiff:
    """One named output of one request, stable against canary."""

    name: str
    rows: int
    absolute_error: float  # summed over rows: each row's mean |canary - stable|
    relative_error: float  # summed over rows: each row's |canary - stable|_1 / |stable|_1
    disagreements: int | None = None  # rows whose class differs; None: not a classification
    top_k_overlap: float | None = None  # summed over rows: shared top-k classes / k
    mismatched: bool = False  # missing from the canary's answer, or another shape


def datatypes(headers: Iterable[tuple[bytes, bytes]], body: bytes) -> dict[str, str]:
    document, _ = split_binary(headers, body)
    return {str(t.get("name")): str(t.get("datatype")) for t in document.get("outputs", []) or []}


def _top_k(values: Array, k: int) -> Array:
    return np.argsort(-values, axis=1, kind="stable")[:, :k]


def compare(
    stable: Mapping[str, Array], canary: Mapping[str, Array], types: Mapping[str, str]
) -> list[OutputDiff]:
    """Per output of stable's answer; pure."""
    diffs = []
    for name, mine in stable.items():
        theirs = canary.get(name)
        rows = int(mine.shape[0])
        if theirs is None or theirs.shape != mine.shape:
            classified = _classification(types.get(name, ""), mine)
            diffs.append(
                OutputDiff(
                    name,
                    rows,
                    absolute_error=math.nan,
                    relative_error=float(rows),
                    disagreements=rows if classified else None,
                    top_k_overlap=0.0 if classified else None,
                    mismatched=True,
                )
            )
            continue
        gap = np.abs(theirs - mine)
        scale = np.maximum(np.abs(mine).sum(axis=1), 1e-12)
        diff = OutputDiff(
            name,
            rows,
            absolute_error=float(gap.mean(axis=1).sum()),
            relative_error=float((gap.sum(axis=1) / scale).sum()),
        )
        kind = _classification(types.get(name, ""), mine)
        if kind == "scores":
            width = mine.shape[1]
            k = max(1, min(TOP_K, width - 1))
            ours, new = _top_k(mine, k), _top_k(theirs, k)
            shared = (ours[:, :, None] == new[:, None, :]).any(axis=2).sum(axis=1) / k
            diff = replace(
                diff,
                disagreements=int((ours[:, 0] != new[:, 0]).sum()),
                top_k_overlap=float(shared.sum()),
            )
        elif kind == "labels":
            diff = replace(diff, disagreements=int((theirs != mine).any(axis=1).sum()))
        diffs.append(diff)
    return diffs


def _classification(datatype: str, values: Array) -> str | None:
    """``scores`` (one score per class), ``labels`` (class ids) or None (a numeric output)."""
    if datatype in FLOATS and values.ndim == 2 and values.shape[1] >= 2:
        return "scores"
    if datatype in INTEGERS:
        return "labels"
    return None


# -- metrics --------------------------------------------------------------------------------


class OutputWindows(Collector):
    """The last ``size`` rows of each output on both sides, for the PSI gauge at scrape time:
    bins cut at stable's quantiles, per feature, the largest PSI per output."""

    def __init__(self, size: int = 1000) -> None:
        self._size = size
        self.revision = ""
        self._rows: dict[tuple[str, str], deque[Array]] = {}

    def add(self, output: str, side: str, values: Array) -> None:
        rows = self._rows.setdefault((output, side), deque(maxlen=self._size))
        rows.extend(values)

    def clear(self) -> None:
        self._rows.clear()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "modeldeploy_runtime_shadow_output_psi",
            "Population stability index between stable's and the canary's answers to the same"
            " mirrored requests, over the last rows; the largest over the output's features.",
            labels=["revision", "output"],
        )
        for (output, side), stable in list(self._rows.items()):
            if side != "stable" or (output, "canary") not in self._rows:
                continue
            value = output_psi(np.asarray(stable), np.asarray(self._rows[(output, "canary")]))
            if value is not None:
                gauge.add_metric([self.revision, output], value)
        yield gauge


def output_psi(stable: Array, canary: Array) -> float | None:
    """The largest PSI over features, bins cut at stable's quantiles; None without rows."""
    if stable.size == 0 or canary.size == 0:
        return None
    worst = 0.0
    for column in range(stable.shape[1]):
        edges = np.unique(np.quantile(stable[:, column], np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
        reference = np.bincount(np.searchsorted(edges, stable[:, column]), minlength=len(edges) + 1)
        current = np.bincount(np.searchsorted(edges, canary[:, column]), minlength=len(edges) + 1)
        worst = max(worst, psi(reference / reference.sum(), current / current.sum()))
    return worst


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "modeldeploy_runtime_shadow_requests_total",
            "Requests copied to the canary, by result: compared (both answered), error and"
            " timeout (the canary failed an input stable answered), unreachable, refused (by"
            " the canary's door), dropped (the mirror's queue was full).",
            ["revision", "result"],
            registry=registry,
        )
        self.duration = Histogram(
            "modeldeploy_runtime_shadow_duration_seconds",
            "The same mirrored request's latency on each side (stable: as its client saw it;"
            " canary: from sending the copy to its whole answer).",
            ["revision", "side"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rows = Counter(
            "modeldeploy_runtime_shadow_rows_total",
            "Rows of each output compared.",
            ["revision", "output"],
            registry=registry,
        )
        self.disagreements = Counter(
            "modeldeploy_runtime_shadow_disagreements_total",
            "Rows of a classification output whose top-1 class (or label) differs.",
            ["revision", "output"],
            registry=registry,
        )
        self.top_k_overlap = Counter(
            "modeldeploy_runtime_shadow_top_k_overlap_total",
            "Summed over rows of a classification output: the share of stable's top-k classes"
            " among the canary's (k = min(5, classes - 1)).",
            ["revision", "output"],
            registry=registry,
        )
        self.absolute_error = Counter(
            "modeldeploy_runtime_shadow_absolute_error_total",
            "Summed over rows: the row's mean absolute difference.",
            ["revision", "output"],
            registry=registry,
        )
        self.relative_error = Counter(
            "modeldeploy_runtime_shadow_relative_error_total",
            "Summed over rows: |canary - stable|_1 / |stable|_1 of the row (a shape mismatch"
            " counts 1).",
            ["revision", "output"],
            registry=registry,
        )
        self.windows = OutputWindows()
        registry.register(self.windows)
        self._outputs: set[str] = set()
        self.revision = ""

    def start(self, revision: str) -> None:
        """A new canary: series of the last one go, counting starts over."""
        if revision == self.revision:
            return
        for metric in (
            self.requests,
            self.duration,
            self.rows,
            self.disagreements,
            self.top_k_overlap,
            self.absolute_error,
            self.relative_error,
        ):
            metric.clear()
        self.windows.clear()
        self.windows.revision = revision
        self._outputs.clear()
        self.revision = revision

    def output(self, name: str) -> str:
        if name in self._outputs:
            return name
        if len(self._outputs) < MAX_OUTPUT_LABELS:
            self._outputs.add(name)
            return name
        return OTHER

    def record(self, diffs: Iterable[OutputDiff]) -> None:
        revision = self.revision
        for diff in diffs:
            output = self.output(diff.name)
            self.rows.labels(revision, output).inc(diff.rows)
            if not math.isnan(diff.absolute_error):
                self.absolute_error.labels(revision, output).inc(diff.absolute_error)
            self.relative_error.labels(revision, output).inc(diff.relative_error)
            if diff.disagreements is not None:
                self.disagreements.labels(revision, output).inc(diff.disagreements)
            if diff.top_k_overlap is not None:
                self.top_k_overlap.labels(revision, output).inc(diff.top_k_overlap)


# -- the mirror --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcCall:
    """A unary gRPC call to copy: ModelInfer's method, message and metadata."""

    method: str
    message: bytes
    metadata: tuple[tuple[str, str | bytes], ...]  # the caller's key and the mirror header


Call = Request | GrpcCall


@dataclass(frozen=True)
class Copy:
    """One answered request to mirror: what stable was sent and what it answered (for gRPC
    the ModelInferResponse, without headers)."""

    request: Call  # with the caller's credentials and the mirror header
    stable_headers: list[tuple[bytes, bytes]]
    stable_body: bytes
    stable_seconds: float
    config: ShadowConfig


class MirrorFailure(Exception):
    """A copy got no answer: ``timeout``, ``unreachable`` (no connection: a pod gone, an
    address not yet updated) or ``error`` (the canary broke off its answer)."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


class Exchanger(Protocol):
    """What sends a copy to one canary pod: proxy.MirrorConnection (HTTP) or
    grpc_proxy.GrpcMirrorConnection. A gRPC answer is (200, [], message)."""

    async def send(self, request: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]: ...

    def close(self) -> None: ...


Connect = Callable[[tuple[str, int], bool], Exchanger]  # (address, gRPC?)


class Mirror:
    """A bounded queue of copies and the workers that send them. ``submit`` never waits."""

    def __init__(
        self,
        source: ShadowFile,
        metrics: ShadowMetrics,
        connect: Connect,
        *,
        queue_size: int = 64,
        workers: int = 4,
    ) -> None:
        self.source = source
        self.metrics = metrics
        self._connect = connect
        self._queue: asyncio.Queue[Copy] = asyncio.Queue(maxsize=queue_size)
        self._workers = workers
        self._turn = 0
        self._down: dict[tuple[str, int], float] = {}  # address -> until when it is not tried

    def sample(self, draw: float, grpc: bool = False) -> ShadowConfig | None:
        """The config to mirror this request under, when ``draw`` (uniform in [0, 1)) falls
        within its percentage and it names a canary (for the request's protocol)."""
        config = self.source.current()
        if config is None or draw * 100 >= config.percent:
            return None
        return config if (config.grpc_targets if grpc else config.targets) else None

    def submit(self, copy: Copy) -> None:
        self.metrics.start(copy.config.revision)
        try:
            self._queue.put_nowait(copy)
        except asyncio.QueueFull:
            self.metrics.requests.labels(copy.config.revision, "dropped").inc()

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]
        await stop.wait()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _work(self) -> None:
        connections: dict[tuple[tuple[str, int], bool], Exchanger] = {}
        try:
            while True:
                copy = await self._queue.get()
                grpc = isinstance(copy.request, GrpcCall)
                targets = copy.config.grpc_targets if grpc else copy.config.targets
                self._turn = (self._turn + 1) % len(targets)
                target = targets[self._turn]
                if time.monotonic() < self._down.get(target, 0.0):
                    # Refused a moment ago (a pod gone, its address not yet updated): not
                    # tried again for a second, which would cost a connect per copy.
                    self.metrics.requests.labels(copy.config.revision, "unreachable").inc()
                    continue
                key = (target, grpc)
                connection = connections.get(key) or connections.setdefault(
                    key, self._connect(target, grpc)
                )
                try:
                    if await self._mirror(copy, connection) == "unreachable":
                        self._down[target] = time.monotonic() + UNREACHABLE_SECONDS
                except Exception:  # a worker outlives any one copy, or mirroring stops
                    LOG.exception("mirror: a copy failed unexpectedly")
                    connections.pop(key).close()
                    self.metrics.requests.labels(copy.config.revision, "error").inc()
                # Pods come and go: forget connections to addresses no longer named.
                named = {(t, False) for t in copy.config.targets}
                named |= {(t, True) for t in copy.config.grpc_targets}
                for gone in set(connections) - named:
                    connections.pop(gone).close()
        finally:
            for connection in connections.values():
                connection.close()

    async def _mirror(self, copy: Copy, connection: Exchanger) -> str | None:
        """Send one copy and compare the answers; the failure's kind, if it failed."""
        revision = copy.config.revision
        if revision != self.metrics.revision:
            return None  # a copy for a canary that has been replaced meanwhile
        started = time.perf_counter()
        try:
            status, headers, body = await connection.send(copy.request)
        except MirrorFailure as failure:
            LOG.debug("mirror: %s", failure)
            self.metrics.requests.labels(revision, failure.result).inc()
            return failure.result
        seconds = time.perf_counter() - started
        if status in REFUSED:
            self.metrics.requests.labels(revision, "refused").inc()
            return "refused"
        if status != 200:
            self.metrics.requests.labels(revision, "error").inc()
            return "error"
        return await self._compare(copy, headers, body, seconds)

    async def _compare(
        self, copy: Copy, headers: list[tuple[bytes, bytes]], body: bytes, seconds: float
    ) -> str | None:
        """Both answers decoded and compared, and counted."""
        revision = copy.config.revision
        try:
            if len(body) + len(copy.stable_body) <= INLINE_BYTES:
                # Small answers (tens of microseconds): a thread hop would cost more.
                diffs, stable, canary = decode_and_compare(copy, headers, body)
            else:
                diffs, stable, canary = await asyncio.to_thread(
                    decode_and_compare, copy, headers, body
                )
        except DecodeError as error:
            LOG.debug("mirror: cannot compare: %s", error)
            self.metrics.requests.labels(revision, "error").inc()
            return "error"
        if revision != self.metrics.revision:
            return None
        self.metrics.requests.labels(revision, "compared").inc()
        self.metrics.duration.labels(revision, "stable").observe(copy.stable_seconds)
        self.metrics.duration.labels(revision, "canary").observe(seconds)
        self.metrics.record(diffs)
        for diff in diffs:
            if not diff.mismatched:
                output = self.metrics.output(diff.name)
                self.metrics.windows.add(output, "stable", stable[diff.name])
                self.metrics.windows.add(output, "canary", canary[diff.name])
        return None


def decode_and_compare(
    copy: Copy, canary_headers: list[tuple[bytes, bytes]], canary_body: bytes
) -> tuple[list[OutputDiff], dict[str, Array], dict[str, Array]]:
    """Both answers decoded and compared (off the event loop when they are large)."""
    if isinstance(copy.request, GrpcCall):
        message = copy.request.message
        stable = decode_grpc(message, copy.stable_body)[1]
        canary = decode_grpc(message, canary_body)[1]
        types = grpc_datatypes(copy.stable_body)
    else:
        stable = decode_tensors(copy.stable_headers, copy.stable_body, "outputs")
        canary = decode_tensors(canary_headers, canary_body, "outputs")
        types = datatypes(copy.stable_headers, copy.stable_body)
    return compare(stable, canary, types), stable, canary


def grpc_datatypes(response: bytes) -> dict[str, str]:
    from tritonclient.grpc import service_pb2  # noqa: PLC0415 - as drift.decode_grpc

    return {t.name: t.datatype for t in service_pb2.ModelInferResponse.FromString(response).outputs}


def copy_token(salt: str) -> bytes | None:
    """The mirror header's value: keyed by the salt the ModelDeployment's sidecars share
    (its uid, with API keys on); None without one (a token anyone could make proves
    nothing, so copies then count like any call)."""
    if not salt:
        return None
    return hmac.new(salt.encode(), b"modeldeploy shadow copy", hashlib.sha256).hexdigest().encode()


def is_copy(presented: bytes | None, token: bytes | None) -> bool:
    """The mirror header (HTTP) or metadata entry (gRPC) proves a copy."""
    return token is not None and presented is not None and hmac.compare_digest(presented, token)


def mirrored_request(
    request: Request, credentials: list[tuple[bytes, bytes]], token: bytes | None
) -> Request:
    """The copy the canary gets: the same request, with the caller's key (the canary's door
    checks it) and the mirror header; its own body (the original's buffer is given back)."""
    return replace(
        request,
        headers=[*request.headers, *credentials, (MIRROR_HEADER, token or b"1")],
        body=bytearray(request.body),
        reserved=0,
    )
