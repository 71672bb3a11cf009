"""Real object stores on 127.0.0.1 for the fetcher's tests: gofakes3 (an S3-compatible
server on a folder) and go-containerregistry's registry (``crane registry serve`` on a
folder), built by the toolchain from their Go modules (tools/objectstores)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from localcluster.operator import free_port
from localcluster.toolchain import Toolchain


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    root: Path

    def credentials(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "test-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }


def toolchain_binary(name: str) -> Path:
    path = Toolchain.locate().path(name)
    if not os.access(path, os.X_OK):
        message = f"{name} is not built: make toolchain"
        if os.environ.get("MODELDEPLOY_REQUIRE_ALL"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def start_s3(root: Path, bucket: str = "models") -> tuple[subprocess.Popen[bytes], S3Server]:
    port = free_port()
    log = (root / "gofakes3.log").open("wb")
    proc = subprocess.Popen(
        [
            str(toolchain_binary("gofakes3")),
            "-backend=fs",
            f"-fs.path={root / 'data'}",
            "-fs.create",
            f"-host=127.0.0.1:{port}",
            f"-initialbucket={bucket}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/{bucket}", timeout=2).close()  # noqa: S310
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError as error:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                output = (root / "gofakes3.log").read_text()
                raise RuntimeError(f"gofakes3 did not start: {output}") from error
            time.sleep(0.1)
    return proc, S3Server(endpoint, bucket, root)


def wait_for_http(url: str, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()  # noqa: S310
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError as error:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{what} did not start: {log.read_text()}") from error
            time.sleep(0.1)


@dataclass(frozen=True)
class Registry:
    """An OCI registry on 127.0.0.1 (plain http), its blobs in ``root / 'blobs'``."""

    host: str
    root: Path

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps a blob on disk (to corrupt it)."""
        hexdigest = digest.removeprefix("sha256:")
        found = [p for p in (self.root / "blobs").rglob(f"*{hexdigest}*") if p.is_file()]
        assert found, f"no file for {digest} under {self.root / 'blobs'}"
        return found[0]


def start_registry(
    root: Path, address: str = "127.0.0.1"
) -> tuple[subprocess.Popen[bytes], Registry]:
    """``crane registry serve`` on ``address`` (the node's, for pods to pull from)."""
    host = f"{address}:{free_port()}"
    log_path = root / "registry.log"
    (root / "blobs").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [
            str(toolchain_binary("crane")),
            "registry",
            "serve",
            f"--address={host}",
            f"--disk={root / 'blobs'}",
        ],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_for_http(f"http://{host}/v2/", proc, log_path, "crane registry serve")
    return proc, Registry(host, root)


@dataclass(frozen=True)
class MemoryCgroup:
    """A memory cgroup (v1 or v2) that children join through :meth:`join` (a preexec_fn)."""

    path: Path
    v2: bool

    def join(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int:
        """The most it held (page cache included: what a pod's limit counts)."""
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int((self.path / name).read_text())

    def oom_kills(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[MemoryCgroup]:
    """A fresh memory cgroup limited to ``limit_bytes`` without swap, as a pod's memory limit
    is; removed afterwards. Skips (fails under MODELDEPLOY_REQUIRE_ALL) without cgroupfs."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").is_file()
    root = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/memory")
    path = root / f"modeldeploy-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        path.mkdir()
        if v2:
            (path / "memory.max").write_text(str(limit_bytes))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            if (path / "memory.memsw.limit_in_bytes").exists():
                (path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
    except OSError as error:
        message = f"cannot make a memory cgroup under {root} (root and cgroupfs needed): {error}"
        if os.environ.get("MODELDEPLOY_REQUIRE_ALL"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield MemoryCgroup(path, v2)
    finally:
        with contextlib.suppress(OSError):
            path.rmdir()
