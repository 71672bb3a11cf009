"""Helpers of the real-pod tier (tests/realnode): the iris manifests, a steady client."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Self

from localcluster import Cluster
from localcluster.dataplane import infer
from support import condition, get, load_example, merged

MD_LABEL = "serving.modeldeploy.io/modeldeployment"
SETOSA = [5.1, 3.5, 1.4, 0.2]
VERSICOLOR = [6.0, 2.9, 4.5, 1.5]
VIRGINICA = [6.9, 3.1, 5.4, 2.1]
# The versicolor-like row's versicolor probability tells the versions apart.
ANSWERS = {"1": 0.838, "2": 0.888}


def iris(version: str = "1", replicas: int = 1, name: str = "iris", **spec: Any) -> str:
    """examples/iris.yaml at a version of the store, as JSON for `kubectl apply -f -`."""
    manifest = merged(
        load_example("iris.yaml"),
        {
            "metadata": {"name": name},
            "spec": {
                "model": {"version": version, "storageUri": f"pvc://model-store/iris/{version}"},
                "replicas": replicas,
                **spec,
            },
        },
    )
    return json.dumps(manifest)


def ready(cluster: Cluster, namespace: str, name: str = "iris") -> bool:
    found = condition(get(cluster, namespace, "md", name), "Ready")
    return found is not None and found["status"] == "True"


def pods(cluster: Cluster, namespace: str, name: str = "iris") -> list[dict[str, Any]]:
    listed = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", f"{MD_LABEL}={name}")
    return list(listed["items"])


def answering(address: str, version: str | None = None) -> bool:
    """True when the Service answers (by ``version``, if given). Right after Ready, kube-proxy
    may not have programmed the Service's new endpoints yet (it syncs at most once a second)."""
    try:
        answer = infer(address, "iris", [VERSICOLOR])
    except Exception:  # refused or 503 while nothing serves yet
        return False
    return version is None or version_of(answer[0]) == version


def version_of(probabilities: list[float]) -> str | None:
    for version, expected in ANSWERS.items():
        if abs(probabilities[1] - expected) < 0.005:
            return version
    return None


@dataclass
class Outcome:
    at: float
    ok: bool
    version: str | None  # which version answered, told apart by its probabilities
    error: str = ""


class Sampler:
    """Calls :meth:`sample` every ``period`` seconds from a thread while the ``with`` block
    runs, bounded in count and time."""

    def __init__(self, period: float, max_samples: int, max_seconds: float) -> None:
        self.period = period
        self.max_samples = max_samples
        self.max_seconds = max_seconds
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        started = time.monotonic()
        while (
            not self._stop.is_set()
            and self.count < self.max_samples
            and time.monotonic() - started < self.max_seconds
        ):
            at = time.monotonic()
            self.sample()
            self.count += 1
            self._stop.wait(max(0.0, self.period - (time.monotonic() - at)))


class SteadyLoad(Sampler):
    """A client that sends one inference every ``period`` seconds and records every outcome."""

    def __init__(
        self,
        address: str,
        model: str = "iris",
        period: float = 0.1,
        max_requests: int = 6000,
        max_seconds: float = 600.0,
    ) -> None:
        super().__init__(period, max_requests, max_seconds)
        self.address = address
        self.model = model
        self.outcomes: list[Outcome] = []

    def sample(self) -> None:
        at = time.monotonic()
        try:
            answer = infer(self.address, self.model, [VERSICOLOR])
            self.outcomes.append(Outcome(at, True, version_of(answer[0])))
        except Exception as error:  # recorded: the test asserts on them
            self.outcomes.append(Outcome(at, False, None, str(error)[:200]))

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


class CapacityWatch(Sampler):
    """Samples how many ready endpoints the model's Service has: the pods that serve
    clients."""

    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        service: str = "iris",
        period: float = 0.5,
        max_seconds: float = 600.0,
    ) -> None:
        super().__init__(period, 10_000, max_seconds)
        self.cluster = cluster
        self.namespace = namespace
        self.service = service
        self.samples: list[tuple[float, int]] = []

    def ready_endpoints(self) -> int:
        result = self.cluster.kubectl(
            "get",
            "endpointslices",
            "-n",
            self.namespace,
            "-l",
            f"kubernetes.io/service-name={self.service}",
            "-o",
            "json",
            check=False,
        )
        if result.returncode != 0:
            return -1
        slices = json.loads(result.stdout)["items"]
        return sum(
            1
            for piece in slices
            for endpoint in piece.get("endpoints") or []
            if endpoint.get("conditions", {}).get("ready")
        )

    def sample(self) -> None:
        count = self.ready_endpoints()
        if count >= 0:
            self.samples.append((time.monotonic(), count))

    @property
    def minimum(self) -> int:
        return min(count for _, count in self.samples)


def md_status(cluster: Cluster, namespace: str, name: str = "iris") -> dict[str, Any]:
    body = get(cluster, namespace, "md", name) or {}
    status: dict[str, Any] = body.get("status", {})
    return status


def promoted(cluster: Cluster, namespace: str, version: str, name: str = "iris") -> bool:
    status = md_status(cluster, namespace, name)
    return status.get("stable", {}).get("version") == version and not status.get("canary")


def last_history(cluster: Cluster, namespace: str, name: str = "iris") -> dict[str, Any]:
    history = md_status(cluster, namespace, name).get("history") or [{}]
    last: dict[str, Any] = history[-1]
    return last


def in_sidecar(cluster: Cluster, namespace: str, pod: str, code: str) -> str:
    """What ``python3 -c code`` prints in a pod's runtime container (it has no shell tools)."""
    return cluster.kubectl(
        "exec", "-n", namespace, pod, "-c", "runtime", "--", "python3", "-c", code
    ).stdout


def sidecar_metrics(cluster: Cluster, namespace: str, pod: str) -> str:
    """A pod's sidecar /metrics, read from inside the pod."""
    return in_sidecar(
        cluster,
        namespace,
        pod,
        "import urllib.request;"
        "print(urllib.request.urlopen('http://127.0.0.1:9090/metrics').read().decode())",
    )


def plugin(cluster: Cluster, *args: str) -> str:
    """``kubectl modeldeploy ARGS``' output."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeldeploy_operator.plugin",
            *args,
            f"--kubeconfig={cluster.state.kubeconfig}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    retry_after: str | None
    elapsed: float


def post_infer(address: str, rows: list[list[float]], timeout: float = 240.0) -> Answer:
    """One KServe v2 infer over plain HTTP, waiting as long as a wake may take (tritonclient's
    own client gives up after its network timeout)."""
    host, port = address.rsplit(":", 1)
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [len(rows), 4],
                    "datatype": "FP32",
                    "data": [x for row in rows for x in row],
                }
            ]
        }
    )
    started = time.monotonic()
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(
            "POST", "/v2/models/iris/infer", body, {"content-type": "application/json"}
        )
        response = connection.getresponse()
        payload = response.read()
        return Answer(
            response.status,
            json.loads(payload or b"{}"),
            response.getheader("retry-after"),
            time.monotonic() - started,
        )
    finally:
        connection.close()


def reaches_the_activator(address: str) -> bool:
    """``address`` answers /v2/health/live (at zero, the activator answers it itself: a
    Service fresh at zero has no endpoint until its activator slice is programmed)."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", "/v2/health/live")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()
