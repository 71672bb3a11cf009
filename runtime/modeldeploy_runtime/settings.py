"""The sidecar's configuration: command-line flags, or ``MODELDEPLOY_RUNTIME_*`` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELDEPLOY_RUNTIME_", frozen=True)

    upstream_http: str = Field("127.0.0.1:8000", description="Triton's HTTP address")
    upstream_grpc: str = Field("127.0.0.1:8001", description="Triton's gRPC address")
    bind_address: str = Field("0.0.0.0", description="address of the listeners")  # noqa: S104
    http_port: int = Field(8080, description="the proxied KServe v2 HTTP port")
    grpc_port: int = Field(8081, description="the proxied gRPC port")
    metrics_port: int = Field(9090, description="/metrics, /healthz and /readyz")
    model: str = Field("", description="the model this pod serves (bounds the model label)")
    model_version: str = Field("", description="its version (bounds the version label)")
    track: Literal["stable", "canary"] = Field("stable", description="a label on every metric")
    sample_rate: float = Field(
        0.1, ge=0, le=1, description="fraction of requests decoded for drift"
    )
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0, description="larger requests get 413")
    client_timeout_seconds: float = Field(30.0, gt=0, description="to receive a request's body")
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="to receive a request's head, from its first byte"
    )
    idle_timeout_seconds: float = Field(
        60.0, gt=0, description="a kept-alive connection with no request is closed after it"
    )
    max_connections: int = Field(
        4096, gt=0, description="open HTTP client connections; more get 503 and are closed"
    )
    max_buffered_bytes: int = Field(
        128 * 1024 * 1024,
        gt=0,
        description="request bodies held by all connections together; more are shed with 503",
    )
    allow_admin_apis: bool = Field(
        False, description="let keyed clients call Triton's repository, trace and log APIs"
    )
    client_salt: str = Field("", description="keys' hashes in metrics are keyed by it")
    coarsen_outputs: str = Field(
        "", description='JSON rules, e.g. [{"name": "probs", "decimals": 2, "topK": 3}]'
    )
    upstream_timeout_seconds: float = Field(60.0, gt=0, description="for Triton to answer")
    connect_timeout_seconds: float = Field(2.0, gt=0, description="to connect to Triton")
    reference_profile: Path | None = Field(None, description="drift profile: a JSON file or folder")
    archive_manifest: Path | None = Field(
        None, description="the model archive's manifest: its drift profile, without one above"
    )
    drift_window: int = Field(2000, gt=0, description="rows per tensor kept for drift")
    drift_queue_size: int = Field(256, gt=0, description="samples waiting for decoding; more drop")
    stats_interval_seconds: float = Field(
        5.0, gt=0, description="how often Triton's statistics are read"
    )
    drift_top_k: int = Field(20, gt=0, description="features exported per drift gauge")
    api_keys_dir: Path | None = Field(
        None, description="mounted Secret: every line of every file is an accepted key"
    )
    rate_limit_per_client: str | None = Field(None, description="e.g. 100/s, 600/m")
    query_budget: str | None = Field(
        None, pattern=r"^[1-9][0-9]*/[1-9][0-9]*[smhd]$", description="per client, e.g. 10000/24h"
    )
    shadow_file: Path | None = Field(
        None, description="shadow steps: the canary to copy requests to (written by the operator)"
    )
    shadow_timeout_seconds: float = Field(10.0, gt=0, description="for a canary's mirrored answer")
    shadow_queue_size: int = Field(64, gt=0, description="copies waiting to be sent; more drop")
    budget_file: Path | None = Field(
        None, description="clients over budget across replicas (JSON, written by the operator)"
    )

    def upstream_host_port(self) -> tuple[str, int]:
        host, _, port = self.upstream_http.rpartition(":")
        return host or "127.0.0.1", int(port)
