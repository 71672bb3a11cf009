"""The election loop: campaigns for the Lease, keeps it, gives it back; and the write fence.

:class:`LeaderElector` carries out :mod:`.decide` against the API server. Its ``leading``
is computed from the clock at every call, so it turns false the moment the renew deadline
passes, even while a renewal request hangs. :class:`LeaderOnlyApi` puts that in front of
every write reconcile makes: a process that lost the Lease cannot write, whatever its
threads are doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from modeldeploy_operator.k8s.client import FIELD_MANAGER, ApiError, Json, KubeApi, LeaseApi
from modeldeploy_operator.leader.decide import (
    LeaseRecord,
    Observation,
    Timing,
    Verdict,
    decide,
    lease_object,
    next_record,
    observe,
    released,
    still_leading,
)

LEASE_NAME = "modeldeploy-operator"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_namespace(path: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The pod's namespace (from its service account), or ``default`` outside a pod."""
    try:
        return path.read_text().strip() or "default"
    except OSError:
        return "default"


def new_identity() -> str:
    """Hostname (the pod's name in a pod) and a random suffix, like client-go's callers:
    a restarted container is a new candidate."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def micro_time() -> str:
    """Now as a Kubernetes MicroTime."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """One candidate for the Lease ``lease`` (namespace, name)."""

    def __init__(
        self,
        leases: LeaseApi,
        *,
        lease: tuple[str, str],
        identity: str,
        logger: logging.Logger,
        timing: Timing | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_time: Callable[[], str] = micro_time,
    ) -> None:
        self._leases = leases
        self.namespace, self.name = lease
        self.identity = identity
        self.timing = timing or Timing()
        self._logger = logger
        self._clock = clock
        self._wall_time = wall_time
        self._lock = threading.Lock()  # one round at a time; ``leading`` reads are lock-free
        self._seen: Observation | None = None
        self._renewed_at: float | None = None
        self._holder = ""  # last holder seen, for the logs

    @property
    def lease(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def leading(self) -> bool:
        """Holds the Lease now: renewed less than the renew deadline ago."""
        return still_leading(self._renewed_at, self._clock(), self.timing)

    def try_acquire_or_renew(self) -> bool:
        """One round (blocking): read the Lease, decide, write it if allowed. True while this
        candidate holds it. Raises on API errors other than a lost race (409)."""
        with self._lock:
            now = self._clock()
            found = self._leases.get_lease(self.namespace, self.name)
            record = None if found is None else LeaseRecord.of(found)
            version = None if found is None else found["metadata"].get("resourceVersion")
            self._seen = observe(self._seen, record, version, now)
            verdict = decide(self.identity, self._seen, now)
            if verdict is Verdict.WAIT:
                self._renewed_at = None  # somebody else holds it, whatever we believed
                holder = "" if record is None else record.holder
                if holder != self._holder:
                    self._holder = holder
                    self._logger.info(
                        f"Waiting for Lease {self.lease}, held by {holder}",
                        extra={"lease": self.lease, "holder": holder},
                    )
                return False
            wanted = next_record(self.identity, verdict, self._seen, self.timing, self._wall_time())
            body = lease_object(self.namespace, self.name, wanted, version)
            try:
                written = (
                    self._leases.create_lease(body)
                    if verdict is Verdict.CREATE
                    else self._leases.replace_lease(body)
                )
            except ApiError as error:
                if error.status != 409:
                    raise
                self._renewed_at = None  # another candidate wrote first: read again next round
                return False
            self._seen = observe(
                self._seen, LeaseRecord.of(written), written["metadata"].get("resourceVersion"), now
            )
            self._renewed_at = now  # timed from before the request: errs on the safe side
            if verdict is not Verdict.RENEW:
                self._holder = self.identity
                self._logger.info(
                    f"Acquired Lease {self.lease}",
                    extra={"lease": self.lease, "identity": self.identity},
                )
            return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Try every retry period until this candidate holds the Lease (True) or ``stop`` is
        set (False)."""
        while not stop.is_set():
            if await self._round("acquire"):
                return True
            await _sleep(stop, self.timing.retry_period)
        return False

    async def keep(self, stop: asyncio.Event) -> bool:
        """Renew every retry period. Returns True when the Lease was lost (the renew
        deadline passed, or somebody else holds it): the caller must stop and exit. False
        when ``stop`` was set."""
        while True:
            await _sleep(stop, self.timing.retry_period)
            if stop.is_set():
                return False
            await self._round("renew")
            if not self.leading:
                why = (
                    f"now held by {self._holder}"
                    if self._holder not in ("", self.identity)
                    else f"not renewed within {self.timing.renew_deadline:g} s"
                )
                self._logger.error(
                    f"Lost Lease {self.lease}: {why}",
                    extra={"lease": self.lease, "identity": self.identity},
                )
                return True

    def release(self) -> None:
        """Give the Lease back (holder empty, duration 1 s) so a successor takes over at its
        next try. Only while still holding it: an expired Lease may be somebody else's."""
        with self._lock:
            if not self.leading or self._seen is None or self._seen.record is None:
                return
            self._renewed_at = None  # the fence closes before the request goes out
            record = released(self._seen.record, self._wall_time())
            body = lease_object(self.namespace, self.name, record, self._seen.resource_version)
            try:
                self._leases.replace_lease(body)
            except Exception as error:  # the Lease then expires on its own
                self._logger.warning(
                    f"Could not release Lease {self.lease}: {error}", extra={"lease": self.lease}
                )
                return
            self._logger.info(f"Released Lease {self.lease}", extra={"lease": self.lease})

    async def _round(self, what: str) -> bool:
        try:
            return await asyncio.to_thread(self.try_acquire_or_renew)
        except Exception as error:
            self._logger.warning(
                f"Could not {what} Lease {self.lease}: {error}", extra={"lease": self.lease}
            )
            return False


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


class NotLeading(RuntimeError):
    """A write refused because this process does not hold the Lease (any more)."""


class LeaderOnlyApi:
    """:class:`KubeApi` that passes reads through and refuses every write unless
    ``may_write()`` holds at the moment of the request."""

    def __init__(self, api: KubeApi, may_write: Callable[[], bool]) -> None:
        self._api = api
        self._may_write = may_write

    def _check(self, what: str) -> None:
        if not self._may_write():
            raise NotLeading(f"refused to {what}: this process does not hold the leader Lease")

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Json | None:
        return self._api.get(api_version, kind, namespace, name)

    def exists(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        return self._api.exists(api_version, kind, namespace, name)

    def events_of(self, namespace: str, kind: str, name: str) -> list[Json]:
        return self._api.events_of(namespace, kind, name)

    def list(
        self, api_version: str, kind: str, namespace: str | None, selector: str = ""
    ) -> list[Json]:
        return self._api.list(api_version, kind, namespace, selector)

    def apply(self, obj: Mapping[str, Any], field_manager: str = FIELD_MANAGER) -> Json:
        self._check(f"apply {obj['kind']} {obj['metadata']['name']}")
        return self._api.apply(obj, field_manager)

    def patch_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        resource_version: str | None = None,
    ) -> Json:
        self._check(f"write the status of {namespace}/{name}")
        return self._api.patch_status(namespace, name, status, resource_version)

    def merge_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        field_manager: str = FIELD_MANAGER,
    ) -> Json:
        self._check(f"patch {kind} {namespace}/{name}")
        return self._api.merge_patch(api_version, kind, namespace, name, patch, field_manager)

    def set_pod_condition(self, namespace: str, name: str, condition: Mapping[str, Any]) -> Json:
        self._check(f"set a condition of pod {namespace}/{name}")
        return self._api.set_pod_condition(namespace, name, condition)

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._check(f"delete {kind} {namespace}/{name}")
        self._api.delete(api_version, kind, namespace, name)

    def emit_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> str:
        self._check(f"emit Event {reason}")
        return self._api.emit_event(involved, type_, reason, message)
