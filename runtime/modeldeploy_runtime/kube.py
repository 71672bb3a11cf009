"""The runtime's one door to the Kubernetes API: ModelDeployments listed, watched and woken.

The runtime must stay light (``.importlinter``: no ``kubernetes``, no ``kopf``), and the
activator needs only three calls, so this is plain urllib3 and json:

- list every ModelDeployment (cluster-wide, or in one namespace) with its resourceVersion;
- watch from that resourceVersion (newline-delimited JSON events, bookmarks included);
- patch a ModelDeployment's scale subresource with a JSON patch whose ``test`` op makes the
  wake conditional: of two activators waking the same model, one raises the scale and the
  other gets 422, which means "already woken".

Every call blocks, so :class:`Watcher` runs the list/watch loop in a daemon thread of its own
and hands each change to the event loop with ``call_soon_threadsafe``; the activator patches
through ``asyncio.to_thread``. The event loop never waits on the API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import urllib3

LOG = logging.getLogger("modeldeploy.runtime.kube")

GROUP = "serving.modeldeploy.io"
VERSION = "v1alpha1"
PLURAL = "modeldeployments"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_FILE = SERVICE_ACCOUNT / "token"
CA_FILE = SERVICE_ACCOUNT / "ca.crt"
REQUEST_TIMEOUT = 10.0  # seconds, to connect and between bytes of an answer
WATCH_SECONDS = 300  # the server ends each watch after this; the client then watches again
WATCH_SLACK = 30.0  # a watch silent this much longer than its timeout (no bookmark) is dead
BACKOFF_MIN = 0.5
BACKOFF_MAX = 10.0

Key = tuple[str, str]  # (namespace, name)
Changes = dict[Key, dict[str, Any] | None]  # None: the ModelDeployment is gone


class KubeError(Exception):
    """A call the API server refused or did not answer; ``status`` 0 when it never did."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Gone(KubeError):
    """410: the watch's resourceVersion is too old; list again."""

    def __init__(self, message: str = "the watch's resourceVersion expired (410 Gone)") -> None:
        super().__init__(410, message)


def key_of(obj: Mapping[str, Any]) -> Key:
    metadata = obj.get("metadata") or {}
    return str(metadata.get("namespace") or ""), str(metadata.get("name") or "")


class KubeApi:
    """A minimal client for ModelDeployments over urllib3.

    The token is read from its file on every request: projected ServiceAccount tokens rotate
    (about hourly) and a token read once at start would expire under a long-running pod."""

    def __init__(
        self,
        url: str,
        *,
        token_file: Path | None = None,
        ca_file: Path | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.url = url.rstrip("/")
        self._token_file = token_file
        self._timeout = timeout
        options: dict[str, Any] = {}
        if self.url.startswith("https://"):
            options["cert_reqs"] = "CERT_REQUIRED"
            if ca_file is not None and ca_file.is_file():
                options["ca_certs"] = str(ca_file)
        # retries=False: every failure is the caller's to see (and back off from).
        self._pool = urllib3.PoolManager(num_pools=2, maxsize=4, retries=False, **options)

    @classmethod
    def configured(
        cls,
        url: str | None = None,
        token_file: Path | None = None,
        ca_file: Path | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> KubeApi:
        """The in-cluster defaults (the Service's address from the environment, the pod's
        ServiceAccount token and CA), each overridden by what is given."""
        if url is None:
            host = environ.get("KUBERNETES_SERVICE_HOST")
            port = environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise KubeError(
                    0, "not running in a cluster (no KUBERNETES_SERVICE_HOST): give --api-url"
                )
            url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        return cls(url, token_file=token_file or TOKEN_FILE, ca_file=ca_file or CA_FILE)

    def collection(self, namespace: str | None = None) -> str:
        where = f"/namespaces/{namespace}" if namespace else ""
        return f"/apis/{GROUP}/{VERSION}{where}/{PLURAL}"

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if self._token_file is not None:
            with contextlib.suppress(OSError):  # no token (a test's plain-http API server)
                token = self._token_file.read_text().strip()
                if token:
                    headers["Authorization"] = f"Bearer {token}"
        return headers

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        read_timeout: float | None = None,
        stream: bool = False,
    ) -> urllib3.BaseHTTPResponse:
        try:
            return self._pool.request(
                method,
                self.url + path,
                body=body,
                headers=self._headers(content_type),
                timeout=urllib3.Timeout(connect=self._timeout, read=read_timeout or self._timeout),
                preload_content=not stream,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as error:
            raise KubeError(0, f"{method} {path}: {error}") from error

    @staticmethod
    def _failure(method: str, path: str, response: urllib3.BaseHTTPResponse) -> KubeError:
        text = response.data.decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):  # not a Status: the text
            text = str(json.loads(text).get("message") or text)
        message = f"{method} {path}: {response.status}: {text[:500]}"
        return Gone(message) if response.status == 410 else KubeError(response.status, message)

    def list(self, namespace: str | None = None) -> tuple[list[dict[str, Any]], str]:
        """Every ModelDeployment and the list's resourceVersion, to watch from."""
        path = self.collection(namespace)
        response = self._request("GET", path)
        if response.status != 200:
            raise self._failure("GET", path, response)
        try:
            listed = json.loads(response.data)
        except ValueError as error:
            raise KubeError(response.status, f"GET {path}: not JSON: {error}") from error
        version = str((listed.get("metadata") or {}).get("resourceVersion") or "")
        return list(listed.get("items") or []), version

    def watch(
        self,
        resource_version: str,
        namespace: str | None = None,
        timeout_seconds: int = WATCH_SECONDS,
    ) -> Iterator[dict[str, Any]]:
        """The events after ``resource_version`` until the server ends the watch. Gone when
        the version expired (as an answer or as an ERROR event); KubeError on any failure."""
        path = (
            f"{self.collection(namespace)}?watch=1&resourceVersion={resource_version}"
            f"&allowWatchBookmarks=true&timeoutSeconds={timeout_seconds}"
        )
        response = self._request(
            "GET", path, read_timeout=timeout_seconds + WATCH_SLACK, stream=True
        )
        try:
            if response.status != 200:
                response.read()
                raise self._failure("GET", path, response)
            pending = b""
            for piece in response.stream(None):
                pending += piece
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield self._event(line)
            if pending.strip():
                yield self._event(pending)
        except urllib3.exceptions.HTTPError as error:
            raise KubeError(0, f"watch: {error}") from error
        finally:
            response.release_conn()

    @staticmethod
    def _event(line: bytes) -> dict[str, Any]:
        try:
            event: dict[str, Any] = json.loads(line)
        except ValueError as error:
            raise KubeError(0, f"watch: an event that is not JSON: {error}") from error
        if event.get("type") == "ERROR":
            status = event.get("object") or {}
            if status.get("code") == 410:
                raise Gone(str(status.get("message") or "410 Gone"))
            raise KubeError(int(status.get("code") or 0), f"watch: {status.get('message')}")
        return event

    def patch_scale(self, namespace: str, name: str, replicas: int) -> bool:
        """Raise the scale from 0 to ``replicas``: True when this call did, False when the
        scale was no longer 0 (422: the ``test`` op failed; someone else woke it)."""
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/scale"
        # autoscaling/v1 Scale omits a 0 replicas (omitempty): at zero its spec is {}, so
        # the test is on the whole spec (a test of /spec/replicas always failed at 0).
        patch = [
            {"op": "test", "path": "/spec", "value": {}},
            {"op": "add", "path": "/spec/replicas", "value": replicas},
        ]
        response = self._request(
            "PATCH",
            path,
            body=json.dumps(patch).encode(),
            content_type="application/json-patch+json",
        )
        if response.status == 422:
            return False
        if not 200 <= response.status < 300:
            raise self._failure("PATCH", path, response)
        return True


class Watcher:
    """Keeps a snapshot of the ModelDeployments and hands every change to ``deliver``.

    A daemon thread lists, then watches from the list's resourceVersion (bookmarks keep it
    fresh); a watch the server ends normally is resumed from the last version seen. On 410
    Gone or any failure it lists again after a backoff (0.5 s doubling to 10 s), and what
    changed between the two lists (deleted ones included) is delivered as one batch. Every
    list delivers a batch, empty or not: the first one says the snapshot is complete.

    With ``loop``, ``deliver`` runs on that event loop (``call_soon_threadsafe``); without,
    on the watcher's thread (tests)."""

    def __init__(
        self,
        api: KubeApi,
        deliver: Callable[[Changes], None],
        *,
        namespace: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout_seconds: int = WATCH_SECONDS,
    ) -> None:
        self._api = api
        self._deliver = deliver
        self._namespace = namespace
        self._loop = loop
        self._timeout_seconds = timeout_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="modeldeployment-watch", daemon=True)
        self.snapshot: dict[Key, dict[str, Any]] = {}
        self.lists = 0  # lists done (for tests and logs)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current call (a daemon thread: a watch blocked in a read goes with
        the process)."""
        self._stop.set()

    def run(self) -> None:
        delay = BACKOFF_MIN
        while not self._stop.is_set():
            try:
                items, version = self._api.list(self._namespace)
                self._replace(items)
                while not self._stop.is_set():
                    for event in self._api.watch(version, self._namespace, self._timeout_seconds):
                        version = self._apply(event) or version
                        delay = BACKOFF_MIN
                        if self._stop.is_set():
                            return
                    delay = BACKOFF_MIN  # ended by the server's timeout: watch on
            except Gone as error:
                LOG.info("listing ModelDeployments again: %s", error.message)
            except KubeError as error:
                LOG.warning("watching ModelDeployments failed: %s", error.message)
            except Exception:  # a bug must not end the thread: the activator would go stale
                LOG.exception("watching ModelDeployments failed unexpectedly")
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, BACKOFF_MAX)

    def _replace(self, items: list[dict[str, Any]]) -> None:
        fresh = {key_of(obj): obj for obj in items}
        changes: Changes = {key: obj for key, obj in fresh.items() if self.snapshot.get(key) != obj}
        changes.update({key: None for key in self.snapshot if key not in fresh})
        self.snapshot = fresh
        self.lists += 1
        self._hand(changes)

    def _apply(self, event: dict[str, Any]) -> str | None:
        """One event into the snapshot; the resourceVersion it carries."""
        kind = event.get("type")
        obj = event.get("object") or {}
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            key = key_of(obj)
            self.snapshot[key] = obj
            self._hand({key: obj})
        elif kind == "DELETED":
            key = key_of(obj)
            self.snapshot.pop(key, None)
            self._hand({key: None})
        return str(version) if version else None

    def _hand(self, changes: Changes) -> None:
        if self._loop is None:
            self._deliver(changes)
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, changes)
        except RuntimeError:  # the loop is closed: the process is ending
            self._stop.set()
