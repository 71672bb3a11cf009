"""The only code of ours that talks to the Kubernetes API (kopf's watches aside).

:class:`KubeApi` is the narrow interface reconcile needs; :class:`KubernetesApi` implements
it over the official client's ``ApiClient`` with plain dicts in and out. Children are written
with server-side apply under one field manager, status through the status subresource.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import functools
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from modeldeploy_operator.api.v1alpha1 import GROUP, PLURAL, VERSION

FIELD_MANAGER = "modeldeploy"
# (connect, read) seconds for every request; the operator's --api-timeout. urllib3 retries a
# failed connect, and a read of an idempotent request (GET, DELETE), up to 3 times.
DEFAULT_TIMEOUT = (10.0, 10.0)
# API Priority and Fairness answers 429 with Retry-After when the operator's flow is over its
# share; the request did not run, so any verb may be sent again (as client-go does).
THROTTLE_RETRIES = 5
THROTTLE_MAX_WAIT = 10.0  # seconds, whatever Retry-After asks
LIST_PAGE = 500  # objects per page of a reflector's list (client-go's pager uses 500 too)
LEASE_API = "coordination.k8s.io/v1"
EVENT_COMPONENT = "modeldeploy-operator"

Json = dict[str, Any]
ApiClient = k8s.ApiClient  # for type hints outside this package


class ApiError(RuntimeError):
    """A request the API server refused; ``status`` is the HTTP code."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = 1.0  # seconds; for a 429, what the server asked (bounded)


class WatchStalled(ApiError):
    """A watch stream that went silent past its inactivity timeout: no event, no bookmark."""

    def __init__(self, path: str, seconds: float) -> None:
        super().__init__(0, "WatchStalled", f"WATCH {path}: nothing for {seconds:g} s")


def retry_after(value: str | None) -> float:
    """A Retry-After header in seconds (the API server sends whole seconds), within
    [0.1, THROTTLE_MAX_WAIT]; 1 s when missing or unreadable."""
    try:
        seconds = float(value) if value else 1.0
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.1), THROTTLE_MAX_WAIT)


@dataclass(frozen=True)
class Connection:
    """How to reach the API server, for the watch machinery (kopf) to use the same login."""

    server: str
    ca_path: str | None
    insecure: bool
    certificate_path: str | None
    private_key_path: str | None
    token: str | None


def load_api_client(kubeconfig: str | None) -> k8s.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (or $KUBECONFIG)."""
    if kubeconfig is None:
        with contextlib.suppress(k8s_config.ConfigException):
            k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
            return api_client(k8s.Configuration.get_default_copy())
    k8s_config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    return api_client(k8s.Configuration.get_default_copy())


def api_client(configuration: k8s.Configuration) -> k8s.ApiClient:
    """A client whose urllib3 retries connection failures (3 times) but leaves a 429's
    Retry-After to :class:`KubernetesApi`, which bounds and counts the wait (urllib3 would
    sleep whatever the server asks, unseen)."""
    configuration.retries = urllib3.Retry(total=3, respect_retry_after_header=False)
    return k8s.ApiClient(configuration)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization`` value. The client's kubeconfig loader stores
    ``Bearer <token>``, its in-cluster loader ``bearer <token>``: the scheme is
    case-insensitive (RFC 9110), and kopf adds its own."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return authorization.strip()


def connection_of(api_client: k8s.ApiClient) -> Connection:
    config = api_client.configuration
    authorization = (config.api_key or {}).get("authorization") or (config.api_key or {}).get(
        "BearerToken"
    )
    token = bearer_token(authorization)
    return Connection(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
        token=token,
    )


METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


class KubeApi(Protocol):
    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Json | None: ...

    def exists(self, api_version: str, kind: str, namespace: str, name: str) -> bool: ...

    def list(
        self, api_version: str, kind: str, namespace: str | None, selector: str = ""
    ) -> list[Json]: ...

    def events_of(self, namespace: str, kind: str, name: str) -> builtins.list[Json]: ...

    def apply(self, obj: Mapping[str, Any], field_manager: str = FIELD_MANAGER) -> Json: ...

    def patch_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        resource_version: str | None = None,
    ) -> Json: ...

    def merge_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        field_manager: str = FIELD_MANAGER,
    ) -> Json: ...

    def set_pod_condition(
        self, namespace: str, name: str, condition: Mapping[str, Any]
    ) -> Json: ...

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None: ...

    def emit_event(
        self, involved: Mapping[str, Any], type_: str, reason: str, message: str
    ) -> str: ...


# Paths of the resources we touch: (api version, kind) -> plural.
PLURALS = {
    ("apps/v1", "Deployment"): "deployments",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Node"): "nodes",
    ("v1", "Secret"): "secrets",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Event"): "events",
    (f"{GROUP}/{VERSION}", "ModelDeployment"): PLURAL,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproutes",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects",
    ("coordination.k8s.io/v1", "Lease"): "leases",
    ("discovery.k8s.io/v1", "EndpointSlice"): "endpointslices",
}
CLUSTER_SCOPED = {"Node"}


def resource_path(
    api_version: str, kind: str, namespace: str | None, name: str | None = None
) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    plural = PLURALS[(api_version, kind)]
    path = (
        base
        if kind in CLUSTER_SCOPED or namespace is None
        else f"{base}/namespaces/{quote(namespace)}"
    )
    path = f"{path}/{plural}"
    return f"{path}/{quote(name)}" if name else path


RequestHook = Callable[[str, str, int], None]


class KubernetesApi:
    """:class:`KubeApi` over ``kubernetes.client.ApiClient``.

    ``on_request(verb, kind, code)`` is called after every request; the operator counts them.
    Every request has a ``timeout`` of (connect, read) seconds: an API server that accepts and
    never answers is an :class:`ApiError` with status 0, not a reconcile that hangs. A 429
    (API Priority and Fairness throttling the operator) is retried after its Retry-After (at
    most ``THROTTLE_MAX_WAIT`` seconds each, ``THROTTLE_RETRIES`` times), then raised.
    """

    def __init__(
        self,
        api_client: k8s.ApiClient,
        on_request: RequestHook | None = None,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if min(timeout) <= 0:
            raise ValueError(f"timeouts must be positive, got {timeout}")
        self._client = api_client
        self._on_request = on_request
        self.timeout = timeout
        self._sleep = sleep

    def _call(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        body: Json | None = None,
        query: list[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Json:
        _, data = self._send(
            method, path, kind=kind, body=body, query=query, headers=headers, timeout=timeout
        )
        payload: Json = json.loads(data or b"{}")
        return payload

    def _send(  # noqa: PLR0913 (the request's parts)
        self,
        method: str,
        path: str,
        *,
        kind: str,
        body: Json | None = None,
        query: list[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | tuple[float, float] | None = None,
        stream: bool = False,
    ) -> tuple[Any, bytes | None]:
        """One request, counted, its failures as ApiError; a 429 waited out and sent again.
        Returns the response and its body, read unless ``stream`` (then the caller reads the
        response as it comes)."""
        send = functools.partial(
            self._send_once,
            method,
            path,
            kind=kind,
            body=body,
            query=query,
            headers=headers,
            timeout=timeout,
            stream=stream,
        )
        for attempt in range(THROTTLE_RETRIES + 1):
            try:
                return send()
            except ApiError as error:
                if error.status != 429 or attempt == THROTTLE_RETRIES:
                    raise
                self._sleep(error.retry_after)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _send_once(  # noqa: PLR0913 (the request's parts)
        self,
        method: str,
        path: str,
        *,
        kind: str,
        body: Json | None = None,
        query: list[tuple[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | tuple[float, float] | None = None,
        stream: bool = False,
    ) -> tuple[Any, bytes | None]:
        header_params = {"Accept": "application/json", "Content-Type": "application/json"}
        header_params.update(headers or {})
        applying = header_params["Content-Type"] == "application/apply-patch+yaml"
        verb = "WATCH" if stream else "APPLY" if applying else method
        request = self._client.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=header_params,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._client.call_api(
                *request, _request_timeout=self.timeout if timeout is None else timeout
            )
            # The client does not preload bodies: reading can time out too.
            data: bytes | None = None
            if not stream or response.status >= 400:
                data = response.read()  # type: ignore[no-untyped-call]
        except ApiException as error:  # connection-level failures (TLS)
            self._count(verb, kind, error.status or 0)
            raise ApiError(error.status or 0, "ConnectionFailed", str(error.reason)) from error
        except urllib3.exceptions.HTTPError as error:  # refused, reset, timed out (retries spent)
            self._count(verb, kind, 0)
            raise self._connection_error("WATCH" if stream else method, path, error) from error
        self._count(verb, kind, response.status)
        if response.status >= 400:
            refused = _api_error(response.status, response.reason or "", data)
            if response.status == 429:
                refused.retry_after = retry_after(response.headers.get("Retry-After"))
            raise refused
        return response, data

    def forget_connections(self) -> None:
        """Close the idle keep-alive connections; the next requests open new ones. Called when
        one connection went silent (a request or a watch timed out): whatever silenced it (a
        middlebox that lost its state, an API server restarted behind one) silenced the
        others too, and each would cost the next write a whole read timeout. The kubelet closes
        all its connections after a failed heartbeat for the same reason. Connections in
        flight finish and are closed, not pooled."""
        self._client.rest_client.pool_manager.clear()

    def _connection_error(
        self, method: str, path: str, error: urllib3.exceptions.HTTPError
    ) -> ApiError:
        cause = getattr(error, "reason", None) or error  # MaxRetryError wraps the last one
        # urllib3's NewConnectionError (refused, unreachable) subclasses its ConnectTimeoutError.
        timed_out = isinstance(cause, urllib3.exceptions.TimeoutError) and not isinstance(
            cause, urllib3.exceptions.NewConnectionError
        )
        if timed_out:
            self.forget_connections()
            connect, read = self.timeout
            return ApiError(
                0,
                "Timeout",
                f"{method} {path}: no answer within {connect:g} s (connect) / {read:g} s (read)",
            )
        return ApiError(0, "ConnectionFailed", f"{method} {path}: {error}")

    def _count(self, verb: str, kind: str, code: int) -> None:
        if self._on_request is not None:
            self._on_request(verb, kind, code)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Json | None:
        try:
            return self._call("GET", resource_path(api_version, kind, namespace, name), kind=kind)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def exists(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Whether the object exists, read as its metadata only (PartialObjectMetadata): a
        Secret's data never reaches the operator."""
        try:
            path = resource_path(api_version, kind, namespace, name)
            self._call("GET", path, kind=kind, headers={"Accept": METADATA_ONLY})
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return True

    def served(self, api_version: str, kind: str) -> bool:
        """Whether the API server serves ``kind`` (its CRD installed), from discovery."""
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        try:
            found = self._call("GET", base, kind="discovery")
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return any(r.get("kind") == kind for r in found.get("resources") or [])

    def list(
        self, api_version: str, kind: str, namespace: str | None, selector: str = ""
    ) -> list[Json]:
        query = [("labelSelector", selector)] if selector else []
        result = self._call(
            "GET", resource_path(api_version, kind, namespace), kind=kind, query=query
        )
        items: list[Json] = result.get("items", [])
        return items

    def events_of(self, namespace: str, kind: str, name: str) -> builtins.list[Json]:
        """The core/v1 Events about one object (what ``kubectl describe`` shows), found by
        field selector on the server."""
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        result = self._call(
            "GET",
            resource_path("v1", "Event", namespace),
            kind="Event",
            query=[("fieldSelector", selector)],
        )
        items: builtins.list[Json] = result.get("items", [])
        return items

    def list_all(
        self, api_version: str, kind: str, namespace: str | None, selector: str = ""
    ) -> tuple[builtins.list[Json], str]:
        """Every object, in pages of :data:`LIST_PAGE`, and the list's resourceVersion (where
        a watch picks up). A 410 means a page's continue token expired: the caller lists
        again."""
        path = resource_path(api_version, kind, namespace)
        items: builtins.list[Json] = []
        token = ""
        while True:
            query = [("limit", str(LIST_PAGE))]
            query += [("labelSelector", selector)] if selector else []
            query += [("continue", token)] if token else []
            page = self._call("GET", path, kind=kind, query=query)
            items += page.get("items") or []
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def watch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        *,
        selector: str,
        resource_version: str,
        timeout_seconds: int,
        inactivity_seconds: float,
    ) -> Iterator[Json]:
        """Opens the watch (the answer's head has arrived when this returns) and gives its
        events after ``resource_version`` (bookmarks included), until the server ends the
        stream after ``timeout_seconds``. A stream that stays silent for
        ``inactivity_seconds`` (bookmarks arrive about every minute) is dead: WatchStalled.
        A reset is ApiError(0); an expired resourceVersion is ApiError(410), or an ERROR
        event."""
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        query += [("labelSelector", selector)] if selector else []
        path = resource_path(api_version, kind, namespace)
        response, _ = self._send(
            "GET",
            path,
            kind=kind,
            query=query,
            timeout=(self.timeout[0], inactivity_seconds),  # the read timeout: per read
            stream=True,
        )
        return self._events(response.response, path, inactivity_seconds)

    def _events(
        self, stream: urllib3.BaseHTTPResponse, path: str, inactivity_seconds: float
    ) -> Iterator[Json]:
        try:
            for line in iter_resp_lines(stream):  # type: ignore[no-untyped-call]
                if line:
                    event: Json = json.loads(line)
                    yield event
        except urllib3.exceptions.ReadTimeoutError as error:
            self.forget_connections()
            raise WatchStalled(path, inactivity_seconds) from error
        except urllib3.exceptions.HTTPError as error:  # reset
            raise self._connection_error("WATCH", path, error) from error
        finally:
            stream.close()  # a stream left part-read must not go back to the pool
            stream.release_conn()

    def apply(self, obj: Mapping[str, Any], field_manager: str = FIELD_MANAGER) -> Json:
        """Server-side apply; forces conflicts, so hand edits of our fields are taken back."""
        meta = obj["metadata"]
        path = resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return self._call(
            "PATCH",
            path,
            kind=obj["kind"],
            body=dict(obj),
            query=[("fieldManager", field_manager), ("force", "true")],
            headers={"Content-Type": "application/apply-patch+yaml"},
        )

    def patch_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        resource_version: str | None = None,
    ) -> Json:
        """Merge-patch the status; with ``resource_version``, only if nobody wrote the object
        since it was read (409 Conflict otherwise)."""
        path = resource_path(f"{GROUP}/{VERSION}", "ModelDeployment", namespace, name) + "/status"
        body: Json = {"status": dict(status)}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        return self._call(
            "PATCH",
            path,
            kind="ModelDeployment",
            body=body,
            headers={"Content-Type": "application/merge-patch+json"},
        )

    def merge_patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        field_manager: str = FIELD_MANAGER,
    ) -> Json:
        """A JSON merge patch (for the scale subresource, kind is e.g. ``Deployment/scale``)."""
        base, _, sub = kind.partition("/")
        path = resource_path(api_version, base, namespace, name) + (f"/{sub}" if sub else "")
        return self._call(
            "PATCH",
            path,
            kind=base,
            body=dict(patch),
            query=[("fieldManager", field_manager)],
            headers={"Content-Type": "application/merge-patch+json"},
        )

    def set_pod_condition(self, namespace: str, name: str, condition: Mapping[str, Any]) -> Json:
        """One condition of a pod's status (a readiness gate's), by a strategic merge patch:
        conditions merge by type, so the kubelet's stay as they are."""
        path = resource_path("v1", "Pod", namespace, name) + "/status"
        return self._call(
            "PATCH",
            path,
            kind="Pod",
            body={"status": {"conditions": [dict(condition)]}},
            query=[("fieldManager", FIELD_MANAGER)],
            headers={"Content-Type": "application/strategic-merge-patch+json"},
        )

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete in the foreground is not needed: owner references take the pods."""
        try:
            self._call("DELETE", resource_path(api_version, kind, namespace, name), kind=kind)
        except ApiError as error:
            if error.status != 404:
                raise

    def emit_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> str:
        """Post a new Event; returns its name (similar ones patch its count: act)."""
        meta = involved["metadata"]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        name = f"{meta['name']}.{uuid.uuid4().hex[:16]}"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": EVENT_COMPONENT},
            "reportingComponent": EVENT_COMPONENT,
            "reportingInstance": EVENT_COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self._call(
            "POST", resource_path("v1", "Event", meta["namespace"]), kind="Event", body=event
        )
        return name


class LeaseApi(Protocol):
    """The Lease requests leader election needs: read, create, replace on a resourceVersion."""

    def get_lease(self, namespace: str, name: str) -> Json | None: ...

    def create_lease(self, lease: Mapping[str, Any]) -> Json: ...

    def replace_lease(self, lease: Mapping[str, Any]) -> Json: ...


class KubernetesLeases(KubernetesApi):
    """:class:`LeaseApi` over ``kubernetes.client.ApiClient``; every request is bounded by
    ``timeout`` seconds, so a hung connection cannot outlast the renew deadline."""

    def __init__(
        self, api_client: k8s.ApiClient, timeout: float, on_request: RequestHook | None = None
    ) -> None:
        super().__init__(api_client, on_request)
        self._timeout = timeout

    def get_lease(self, namespace: str, name: str) -> Json | None:
        try:
            return self._call(
                "GET",
                resource_path(LEASE_API, "Lease", namespace, name),
                kind="Lease",
                timeout=self._timeout,
            )
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def create_lease(self, lease: Mapping[str, Any]) -> Json:
        """POST; 409 AlreadyExists when another candidate created it first."""
        path = resource_path(LEASE_API, "Lease", lease["metadata"]["namespace"])
        return self._call("POST", path, kind="Lease", body=dict(lease), timeout=self._timeout)

    def replace_lease(self, lease: Mapping[str, Any]) -> Json:
        """PUT with the ``metadata.resourceVersion`` read: 409 Conflict when anybody wrote the
        Lease since, so two candidates can never both take it."""
        meta = lease["metadata"]
        path = resource_path(LEASE_API, "Lease", meta["namespace"], meta["name"])
        return self._call("PUT", path, kind="Lease", body=dict(lease), timeout=self._timeout)


def _api_error(status: int, reason: str, data: bytes | None) -> ApiError:
    """The Status object the API server returns, as an ApiError."""
    message = reason
    try:
        body = json.loads(data or b"{}")
        message = body.get("message", message)
        reason = body.get("reason", reason)
    except ValueError:
        message = (data or b"").decode(errors="replace")[:1024]
    return ApiError(status, reason, message)
