"""Real object stores on 127.0.0.1 for the fetcher's tests: gofakes3 (an S3-compatible
server on a folder), built by the toolchain from its Go module (tools/objectstores)."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
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
