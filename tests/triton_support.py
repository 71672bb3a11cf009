"""Types and helpers shared by the runtime sidecar tests and their fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


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
