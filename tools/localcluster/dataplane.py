"""What runs on the real node for demos and the real-pod tests, and how it is installed.

- **The operator** as users run it: the Helm chart, our operator image, in a pod on the real
  node, reaching the API server through its ServiceAccount token and the ``kubernetes``
  Service.
- **Prometheus** (upstream's, built by ``make toolchain``) on the node address, discovering
  model pods through the API server exactly as the chart's PodMonitor relabels them
  (``namespace``, ``modeldeployment``, ``pod``), so canary analysis and autoscaling query
  real sidecars.
- **A model store**: a folder on this machine served to the fetcher init container as a
  read-only ``pvc://`` claim (a hostPath PersistentVolume bound to one claim).

The manifests and configs are pure functions; the rest runs the pinned kubectl and helm.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from localcluster.cluster import Cluster, ClusterError, repo_root
from localcluster.nodes import GPU_RESOURCE
from localcluster.processes import is_ours
from localcluster.realnode import REAL_NODE_LABEL, RealNodeSpec

OPERATOR_NAMESPACE = "modeldeploy-system"
RELEASE = "modeldeploy"
# The chart's operator pods (its activator pods share the name label).
OPERATOR_PODS = "app.kubernetes.io/name=modeldeploy,app.kubernetes.io/component=operator"
MODEL_STORE_CLAIM = "model-store"
PROMETHEUS_PORT = 9090
SCRAPE_INTERVAL = "2s"


def chart_dir() -> Path:
    return repo_root() / "charts" / "modeldeploy"


def split_reference(reference: str) -> tuple[str, str]:
    """``localhost/modeldeploy-operator:abc`` -> (``localhost/modeldeploy-operator``, ``abc``)."""
    repository, _, tag = reference.rpartition(":")
    if not repository or "/" in tag:
        raise ValueError(f"not a tagged image reference: {reference}")
    return repository, tag


def operator_values(
    operator_image: str,
    runtime_image: str,
    *,
    prometheus_url: str | None,
    watch_namespaces: Iterable[str] = (),
    resync_seconds: int = 30,
    model_cache_dir: Path | None = None,
    replicas: int = 1,
) -> dict[str, Any]:
    """Helm values that run the chart's operator on the real node with our local images.

    The only real node is a GPU node (it carries the GPU taint, and a taint of its own that
    keeps the simulated tier's pods away): the operator tolerates both and selects the node by
    its label. Images are imported, never pulled.
    """
    repository, tag = split_reference(operator_image)
    values: dict[str, Any] = {
        # One real node: a second replica would only stand by beside the first (leader
        # election stays on, as the chart installs it); the HA tests ask for two.
        "replicaCount": replicas,
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "runtime": {"image": runtime_image},
        "operator": {
            "watchNamespaces": list(watch_namespaces),
            "resyncSeconds": resync_seconds,
            "logLevel": "info",
            "nodeSelector": {REAL_NODE_LABEL: "true"},
            "tolerations": [
                {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
                {"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"},
            ],
        },
    }
    # The activator on the real node too (its pods hold requests for models at zero).
    values["activator"] = {
        "nodeSelector": values["operator"]["nodeSelector"],
        "tolerations": values["operator"]["tolerations"],
    }
    if prometheus_url:
        values["operator"]["prometheusUrl"] = prometheus_url
    if model_cache_dir is not None:
        values["modelCache"] = {"hostPath": str(model_cache_dir)}
    return values


def model_store_manifests(
    folder: Path, namespace: str, node: RealNodeSpec, claim: str = MODEL_STORE_CLAIM
) -> list[dict[str, Any]]:
    """A read-only hostPath PersistentVolume on the real node, pre-bound to one claim.

    The PV is cluster-scoped and named after the namespace, so every namespace gets its own.
    """
    volume = f"{claim}-{namespace}"
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume, "labels": {"app.kubernetes.io/part-of": "modeldeploy"}},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(folder), "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": claim},
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "kubernetes.io/hostname",
                                        "operator": "In",
                                        "values": [node.name],
                                    }
                                ]
                            }
                        ]
                    }
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]


def prometheus_config(kubeconfig: Path, interval: str = SCRAPE_INTERVAL) -> dict[str, Any]:
    """Scrape every model pod's sidecar metrics port, found through the API server, with
    the labels the chart's PodMonitor gives them, and the activator's as its PodMonitor does."""
    md_label = "__meta_kubernetes_pod_label_serving_modeldeploy_io_modeldeployment"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": "modeldeploy-models",
                "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubeconfig)}],
                "relabel_configs": [
                    {
                        "source_labels": [
                            "__meta_kubernetes_pod_label_app_kubernetes_io_managed_by"
                        ],
                        "regex": "modeldeploy",
                        "action": "keep",
                    },
                    {
                        "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                        "regex": "proxy-metrics",
                        "action": "keep",
                    },
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": [md_label], "target_label": "modeldeployment"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                ],
            },
            {
                # The activator's series carry the model's namespace and modeldeployment
                # labels (held requests are its traffic): kept, as the chart's PodMonitor does.
                "job_name": "modeldeploy-activator",
                "honor_labels": True,
                "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubeconfig)}],
                "relabel_configs": [
                    {
                        "source_labels": [
                            "__meta_kubernetes_pod_label_app_kubernetes_io_component"
                        ],
                        "regex": "activator",
                        "action": "keep",
                    },
                    {
                        "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                        "regex": "metrics",
                        "action": "keep",
                    },
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                ],
            },
        ],
    }


class ClusterPrometheus:
    """Prometheus on the node address, recorded in the cluster's state (stopped with it)."""

    def __init__(self, cluster: Cluster) -> None:
        if cluster.real_node_spec is None:
            raise ClusterError("Prometheus for model pods needs the cluster's real node")
        self.cluster = cluster
        self.address = f"{cluster.real_node_spec.node_ip}:{PROMETHEUS_PORT}"
        self.workdir = cluster.state.root / "prometheus"
        self.pid_file = cluster.state.root / "prometheus.pid"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def running(self) -> bool:
        if not self.pid_file.exists():
            return False
        pid = int(self.pid_file.read_text().strip() or 0)
        return pid > 0 and is_ours(pid, str(self.workdir))

    def ensure_started(self) -> str:
        """Start it unless it runs; returns its URL."""
        if self.running():
            return self.url
        # Upstream's build (make toolchain): Debian's has no Kubernetes service discovery.
        binary = str(self.cluster.toolchain.path("prometheus"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(self.cluster.state.kubeconfig)))
        with (self.workdir / "prometheus.log").open("ab") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address={self.address}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 30
        while not self._ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(
                    f"prometheus did not start; see {self.workdir / 'prometheus.log'}"
                )
            time.sleep(0.2)
        return self.url

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:  # noqa: S310
                return bool(response.status == 200)
        except OSError:
            return False


def infer(address: str, model: str, rows: list[list[float]]) -> list[list[float]]:
    """One HTTP inference with tritonclient; returns the probabilities per row."""
    import numpy as np  # noqa: PLC0415 - only the demo and tests need them
    import tritonclient.http as triton  # noqa: PLC0415

    client = triton.InferenceServerClient(address, connection_timeout=10, network_timeout=10)
    try:
        tensor = triton.InferInput("features", [len(rows), 4], "FP32")
        tensor.set_data_from_numpy(np.array(rows, dtype=np.float32))
        result = client.infer(model, [tensor])
        answer: list[list[float]] = result.as_numpy("probabilities").tolist()
        return answer
    finally:
        client.close()


def first_answer(
    address: str, model: str, rows: list[list[float]], timeout: float = 30.0
) -> list[list[float]]:
    """:func:`infer`, retried until the Service answers: right after the pods are Ready,
    kube-proxy may not have programmed their endpoints yet (it syncs at most once a second),
    and the Service refuses connections until it has."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return infer(address, model, rows)
        except Exception as error:
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{model} at {address} did not answer in {timeout:.0f}s: {error}"
                ) from error
            time.sleep(0.2)


def apply(cluster: Cluster, documents: Iterable[Mapping[str, Any]]) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(list(documents)))


def serve_model_store(cluster: Cluster, namespace: str, sources: Iterable[Path]) -> Path:
    """The ``sources`` folders merged into one store in the cluster's state, served to
    ``namespace`` as the ``model-store`` claim (``pvc://model-store/<model>/<version>``)."""
    if cluster.real_node_spec is None:
        raise ClusterError("a model store needs the cluster's real node")
    store = cluster.state.root / "model-stores" / namespace
    for source in sources:
        shutil.copytree(source, store, dirs_exist_ok=True)
    for folder in (store, store.parent):
        folder.chmod(0o755)  # model pods run as an unprivileged user
    apply(cluster, model_store_manifests(store, namespace, cluster.real_node_spec))
    return store


def service_address(cluster: Cluster, namespace: str, name: str, port: int = 8000) -> str:
    """``<cluster IP>:<port>`` of a ModelDeployment's Service (HTTP through the sidecar)."""
    ip = cluster.kubectl(
        "get", "service", name, "-n", namespace, "-o", "jsonpath={.spec.clusterIP}"
    ).stdout.strip()
    return f"{ip}:{port}"


def install_operator(
    cluster: Cluster,
    *,
    prometheus_url: str | None,
    watch_namespaces: Iterable[str] = (),
    namespace: str = OPERATOR_NAMESPACE,
    resync_seconds: int = 30,
    model_cache_dir: Path | None = None,
    replicas: int = 1,
) -> None:
    """``helm upgrade --install`` the chart with our images; waits for the operator pod."""
    values = operator_values(
        cluster.image("operator"),
        cluster.image("runtime"),
        prometheus_url=prometheus_url,
        watch_namespaces=watch_namespaces,
        resync_seconds=resync_seconds,
        model_cache_dir=model_cache_dir,
        replicas=replicas,
    )
    values_file = cluster.state.root / "operator-values.yaml"
    values_file.write_text(yaml.safe_dump(values, sort_keys=False))
    cluster.helm(
        "upgrade",
        "--install",
        RELEASE,
        str(chart_dir()),
        "-n",
        namespace,
        "--create-namespace",
        "-f",
        str(values_file),
    )
    cluster.kubectl(
        "rollout", "status", "deployment", "-n", namespace, RELEASE, "--timeout=120s", timeout=130
    )


def uninstall_operator(cluster: Cluster, namespace: str = OPERATOR_NAMESPACE) -> None:
    cluster.helm("uninstall", RELEASE, "-n", namespace, "--wait", check=False)


def operator_pod(cluster: Cluster, namespace: str = OPERATOR_NAMESPACE) -> dict[str, Any] | None:
    pods = json.loads(
        cluster.kubectl("get", "pods", "-n", namespace, "-l", OPERATOR_PODS, "-o", "json").stdout
    )["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    return running[0] if running else None
