"""What each call through the door is, for HTTP and gRPC alike: an allowlist of Triton's API.

- ``health``: liveness and readiness, open to anyone (probes and load balancers).
- ``infer``: every way to run the model (HTTP infer, generate, generate_stream; gRPC
  ModelInfer, ModelStreamInfer per message): keyed, rate-limited, budgeted and measured.
- ``metadata``: server and model metadata, config, readiness and statistics: keyed.
- ``admin``: the repository, trace, logging and shared-memory APIs: refused unless the
  ModelDeployment allows them (``spec.monitoring.runtime.allowAdminApis``), then keyed.

Anything else is not Triton's KServe v2 API and is answered 404 (HTTP) or UNIMPLEMENTED
(gRPC) by the sidecar itself.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from modeldeploy_runtime.http1 import ProtocolError


class Kind(enum.Enum):
    HEALTH = "health"
    INFER = "infer"
    METADATA = "metadata"
    ADMIN = "admin"


@dataclass(frozen=True)
class Route:
    kind: Kind
    model: str = ""
    version: str = ""
    action: str = ""  # infer, generate, generate_stream; for gRPC the method's name


MODEL_PATH = re.compile(
    r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
    r"(?:/(?P<action>infer|generate|generate_stream|ready|config|stats|trace/setting))?$"
)
INFER_ACTIONS = ("infer", "generate", "generate_stream")
ADMIN_PREFIXES = (
    "/v2/repository/",
    "/v2/trace/setting",
    "/v2/logging",
    "/v2/systemsharedmemory",
    "/v2/cudasharedmemory",
)


def http_route(method: bytes, path: str) -> Route:
    """The route of a canonical path, or a ProtocolError (404, 405)."""
    if path in ("/v2/health/live", "/v2/health/ready"):
        return _expect(method, b"GET", Route(Kind.HEALTH))
    if path in ("/v2", "/v2/models/stats"):
        return _expect(method, b"GET", Route(Kind.METADATA))
    if path.startswith(ADMIN_PREFIXES) or path == "/v2/repository/index":
        return Route(Kind.ADMIN, action=path)
    match = MODEL_PATH.match(path)
    if match is None:
        raise ProtocolError(404, "unknown_path", f"{path[:200]} is not part of the inference API")
    model, version, action = match.group("model", "version", "action")
    if action == "trace/setting":
        return Route(Kind.ADMIN, model, version or "", action)
    if action in INFER_ACTIONS:
        return _expect(method, b"POST", Route(Kind.INFER, model, version or "", action))
    return _expect(method, b"GET", Route(Kind.METADATA, model, version or "", action or ""))


def _expect(method: bytes, allowed: bytes, route: Route) -> Route:
    if method != allowed:
        raise ProtocolError(
            405,
            "bad_method",
            f"{route.action or route.kind.value} takes {allowed.decode()}",
            (f"allow: {allowed.decode()}",),
        )
    return route


GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_KINDS = {
    "ServerLive": Kind.HEALTH,
    "ServerReady": Kind.HEALTH,
    "ModelInfer": Kind.INFER,
    "ModelStreamInfer": Kind.INFER,
    "ServerMetadata": Kind.METADATA,
    "ModelReady": Kind.METADATA,
    "ModelMetadata": Kind.METADATA,
    "ModelConfig": Kind.METADATA,
    "ModelStatistics": Kind.METADATA,
    "RepositoryIndex": Kind.ADMIN,
    "RepositoryModelLoad": Kind.ADMIN,
    "RepositoryModelUnload": Kind.ADMIN,
    "SystemSharedMemoryStatus": Kind.ADMIN,
    "SystemSharedMemoryRegister": Kind.ADMIN,
    "SystemSharedMemoryUnregister": Kind.ADMIN,
    "CudaSharedMemoryStatus": Kind.ADMIN,
    "CudaSharedMemoryRegister": Kind.ADMIN,
    "CudaSharedMemoryUnregister": Kind.ADMIN,
    "TraceSetting": Kind.ADMIN,
    "LogSettings": Kind.ADMIN,
}


def grpc_route(method: str) -> Route | None:
    """The route of a full gRPC method name, or None when Triton has no such method."""
    if not method.startswith(GRPC_SERVICE):
        return None
    name = method[len(GRPC_SERVICE) :]
    kind = GRPC_KINDS.get(name)
    return Route(kind, action=name) if kind is not None else None


def admin_refused(what: str) -> ProtocolError:
    """403 / PERMISSION_DENIED for an administrative API the ModelDeployment did not allow."""
    return ProtocolError(
        403,
        "admin_api",
        f"{what[:200]} is an administrative API; this model does not allow it"
        " (spec.monitoring.runtime.allowAdminApis)",
    )
