"""Types and helpers shared by the runtime sidecar tests and their fixtures."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Endpoint:
    """A Triton server's addresses (host:port)."""

    http: str
    grpc: str
    metrics: str


@dataclass(frozen=True)
class Sidecar:
    """A running sidecar's addresses and its log."""

    http: str
    grpc: str
    metrics: str
    log: Path
    pid: int


SidecarFactory = Callable[..., Sidecar]


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout}s: {log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes], group: bool = False) -> None:
    """SIGTERM (to its whole process group when it leads one: tritonserver and its Python
    backend stubs), then SIGKILL after 20 s."""
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
            proc.wait()
    if group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group


TRITON_SERVER = Path(__file__).resolve().parent / "triton" / "triton_server.py"
TRITON_MODELS = ("double", "echo", "slow", "features", "features_2ms")


def start_triton(
    log: Path, ports: tuple[int, int, int]
) -> tuple[subprocess.Popen[bytes], Endpoint]:
    """nvidia-pytriton's tritonserver with the test models, on 127.0.0.1; waits until ready."""
    # Its Python backend stub links the system libpython; point it at this interpreter's.
    libdir = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
    env = {**os.environ, "LD_LIBRARY_PATH": f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(TRITON_SERVER), *map(str, ports)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        for model in TRITON_MODELS:
            wait_http(f"http://127.0.0.1:{ports[0]}/v2/models/{model}/ready", 120, proc, log)
    except BaseException:
        stop(proc, group=True)
        raise
    endpoint = Endpoint(*(f"127.0.0.1:{port}" for port in ports))
    return proc, endpoint


def start_sidecar(
    triton: Endpoint,
    log: Path,
    ports: tuple[int, int, int],
    upstream: str | None = None,
    code: Path | None = None,
    **flags: object,
) -> tuple[subprocess.Popen[bytes], Sidecar]:
    """`modeldeploy-runtime serve` in front of ``triton``; waits until /healthz answers.
    ``code``: a folder holding another ``modeldeploy_runtime`` to run (a benchmark's baseline)."""
    http, grpc, metrics = ports
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
        env = None if code is None else {**os.environ, "PYTHONPATH": str(code)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "modeldeploy_runtime", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    wait_http(f"http://127.0.0.1:{metrics}/healthz", 20, proc, log)
    return proc, Sidecar(
        f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"127.0.0.1:{metrics}", log, proc.pid
    )


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: str) -> Samples:
    """A sidecar's /metrics, parsed with prometheus_client's parser."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()
    )


def json_body(rows: np.ndarray[Any, Any]) -> bytes:
    """A KServe v2 JSON request for the `x` input of the test models."""
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(rows.shape),
                    "datatype": "FP32",
                    "data": rows.ravel().tolist(),
                }
            ]
        }
    ).encode()


class Traffic:
    """Requests to one sidecar in a loop, until stopped; remembers when the first was sent."""

    def __init__(self, sidecar: Sidecar, model: str, payload: Callable[[], bytes]) -> None:
        self.first: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(sidecar, model, payload), daemon=True
        )
        self._thread.start()

    def _run(self, sidecar: Sidecar, model: str, payload: Callable[[], bytes]) -> None:
        url = f"http://{sidecar.http}/v2/models/{model}/infer"
        while not self._stop.is_set():
            request = urllib.request.Request(
                url, data=payload(), headers={"Content-Type": "application/json"}
            )
            self.first = self.first or time.monotonic()
            try:
                with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
                    response.read()
            except (urllib.error.HTTPError, OSError):
                pass
            time.sleep(0.02)

    def signal(self) -> None:
        """Send no more requests (the one in flight completes)."""
        self._stop.set()

    def stop(self) -> None:
        self.signal()
        self._thread.join(timeout=15)


def exchange(address: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` and read until the sidecar closes the connection (or ``timeout``)."""
    host, port = address.split(":")
    received = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused early: the answer may be waiting
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
    return received


def statuses(received: bytes) -> list[int]:
    """The status of every response in a stream of responses."""
    found = []
    for part in received.split(b"HTTP/1.1 ")[1:]:
        code = part[:3]
        if code.isdigit():
            found.append(int(code))
    return found
