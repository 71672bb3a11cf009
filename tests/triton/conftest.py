"""Fixtures for the runtime sidecar tests: a real Triton server and sidecar processes."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster.operator import free_port
from triton_support import Endpoint, Sidecar, SidecarFactory, stop, wait_http

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """nvidia-pytriton's real tritonserver on 127.0.0.1, serving the models of triton_server.py."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton provides the Triton server")
    ports = [free_port() for _ in range(3)]
    log = tmp_path_factory.mktemp("triton") / "triton.log"
    # Its Python backend stub links the system libpython; point it at this interpreter's.
    libdir = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
    env = {**os.environ, "LD_LIBRARY_PATH": f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "triton_server.py"), *map(str, ports)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        for model in ("double", "echo", "slow", "features"):
            wait_http(f"http://127.0.0.1:{ports[0]}/v2/models/{model}/ready", 120, proc, log)
        yield Endpoint(f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[2]}")
    finally:
        stop(proc, group=True)


@pytest.fixture
def sidecar(triton: Endpoint, tmp_path: Path) -> Iterator[SidecarFactory]:
    """Start `modeldeploy-runtime serve` processes in front of Triton; stopped after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(upstream: str | None = None, **flags: object) -> Sidecar:
        http, grpc, metrics = free_port(), free_port(), free_port()
        log = tmp_path / f"sidecar-{len(procs)}.log"
        args = [
            "serve",
            f"--upstream-http={upstream or triton.http}",
            f"--upstream-grpc={triton.grpc if upstream is None else upstream}",
            "--bind-address=127.0.0.1",
            f"--http-port={http}",
            f"--grpc-port={grpc}",
            f"--metrics-port={metrics}",
            *(f"--{k.replace('_', '-')}={v}" for k, v in flags.items()),
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "modeldeploy_runtime", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        wait_http(f"http://127.0.0.1:{metrics}/healthz", 20, proc, log)
        return Sidecar(f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}", log)

    yield start
    for proc in procs:
        stop(proc)
