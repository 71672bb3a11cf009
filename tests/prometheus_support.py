"""A real Prometheus (Debian's package) as a process on 127.0.0.1, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def start_prometheus(
    workdir: Path,
    port: int,
    targets: dict[str, list[str]],
    scrape_interval: str = "1s",
    target_labels: dict[str, dict[str, str]] | None = None,
) -> subprocess.Popen[bytes]:
    """Prometheus scraping ``targets`` (job -> host:port list), with extra labels per job
    (as a PodMonitor's relabelling gives real pods); waits until it is ready."""
    binary = prometheus_binary()
    if binary is None:
        raise RuntimeError("prometheus is not installed (apt-get install prometheus)")
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [
                    {"targets": hosts, "labels": (target_labels or {}).get(job, {})}
                ],
            }
            for job, hosts in targets.items()
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(
                f"prometheus did not start: {(workdir / 'prometheus.log').read_text()[-2000:]}"
            )
        time.sleep(0.2)


def instant_vector(url: str, query: str) -> list[dict[str, Any]]:
    """The result of an instant query (the samples; empty when there is no data)."""
    address = f"{url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(address, timeout=10) as response:  # noqa: S310 - loopback
        document = json.loads(response.read())
    if document.get("status") != "success":
        raise AssertionError(f"{query}: {document.get('error')}")
    result: list[dict[str, Any]] = document["data"]["result"]
    return result
