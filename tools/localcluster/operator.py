"""Run the modeldeploy operator as a real process against the local cluster.

Tests, ``make demo`` and the benchmarks use this: the operator runs exactly as it would in a
pod (``python -m modeldeploy_operator``), with its metrics and liveness endpoints on free
ports of 127.0.0.1 and its JSON logs in a file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from localcluster.cluster import Cluster


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {"name{labels}": value}; enough for tests and benchmarks."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of a metric's series whose labels include ``labels`` (a regex per label)."""
    total = 0.0
    for series, value in metrics.items():
        base, _, rest = series.partition("{")
        if base != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(re.fullmatch(pattern, found.get(key, "")) for key, pattern in labels.items()):
            total += value
    return total


class OperatorProcess:
    """Start, stop and scrape one operator process."""

    def __init__(
        self,
        cluster: Cluster,
        log_path: Path,
        *,
        resync_seconds: float = 3.0,
        extra_args: tuple[str, ...] = (),
        detach: bool = False,
        kubeconfig: Path | None = None,
        source: Path | None = None,
    ) -> None:
        self.cluster = cluster
        self.kubeconfig = kubeconfig or cluster.state.kubeconfig  # another identity, say
        self.log_path = log_path
        self.resync_seconds = resync_seconds
        self.extra_args = extra_args
        self.detach = detach  # own session: outlives the command that started it (make demo)
        self.source = source  # another release's `operator/` folder, run instead of this one
        self.metrics_port = 0
        self.health_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        self.metrics_port, self.health_port = free_port(), free_port()
        self._log = self.log_path.open("ab")
        command = [
            sys.executable,
            "-m",
            "modeldeploy_operator",
            f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            f"--health-port={self.health_port}",
            f"--resync-seconds={self.resync_seconds}",
            "--log-format=json",
            *self.extra_args,
        ]
        self._proc = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            start_new_session=self.detach,
        )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"the operator exited with {self._proc.returncode}; see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the operator did not become healthy; see {self.log_path}")
            time.sleep(0.2)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.source is not None:  # ahead of the installed package (an editable install's
            # finder comes after sys.path)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(self.source), *filter(None, [env.get("PYTHONPATH")])]
            )
        return env

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        code = self._proc.returncode
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def restart(self) -> None:
        self.stop()
        self.start()

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return parse_metrics(response.read().decode())

    def leading(self) -> bool:
        """Whether it holds the leader Lease now (its ``modeldeploy_operator_leader`` gauge)."""
        try:
            return self.metrics().get("modeldeploy_operator_leader") == 1.0
        except OSError:
            return False

    def identity(self) -> str | None:
        """Its leader-election identity, from its last "Starting" log line (JSON logs)."""
        found = None
        for line in self.log_path.read_text().splitlines():
            if '"Starting modeldeploy operator"' in line:
                found = json.loads(line).get("identity")
        return found

    def health(self) -> tuple[int, str]:
        """``/healthz``'s status code and text; (0, why) when it does not answer."""
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status), response.read().decode().strip()
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode().strip()
        except OSError as error:
            return 0, str(error)

    def _healthy(self) -> bool:
        return self.health()[0] == 200
