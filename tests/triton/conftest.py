"""Fixtures for the runtime sidecar tests: a real Triton server and sidecar processes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster.operator import free_port
from triton_support import Endpoint, Sidecar, SidecarFactory, start_sidecar, start_triton, stop


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """nvidia-pytriton's real tritonserver on 127.0.0.1, serving the models of triton_server.py."""
    try:
        import pytriton  # noqa: F401, PLC0415 - nvidia-pytriton provides tritonserver
    except ImportError:
        if os.environ.get("MODELDEPLOY_REQUIRE_ALL"):
            pytest.fail("nvidia-pytriton is not installed; pip install -e '.[dev]'")
        pytest.skip("nvidia-pytriton is not installed")
    log = tmp_path_factory.mktemp("triton") / "triton.log"
    proc, endpoint = start_triton(log, (free_port(), free_port(), free_port()))
    yield endpoint
    stop(proc, group=True)


@pytest.fixture
def sidecar(triton: Endpoint, tmp_path: Path) -> Iterator[SidecarFactory]:
    """Start `modeldeploy-runtime serve` processes in front of Triton; stopped after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(upstream: str | None = None, **flags: object) -> Sidecar:
        log = tmp_path / f"sidecar-{len(procs)}.log"
        proc, sidecar = start_sidecar(
            triton, log, (free_port(), free_port(), free_port()), upstream, None, **flags
        )
        procs.append(proc)
        return sidecar

    yield start
    for proc in procs:
        stop(proc)
