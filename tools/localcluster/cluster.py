"""Start, check and stop the local cluster.

kwokctl does the control plane's process management (certificates, ports, flags, pid files);
this module feeds it our own binaries, adds the simulated GPU nodes and, unless told not to,
a real node whose pods run our images (:mod:`localcluster.realnode`,
:mod:`localcluster.images`), waits until the cluster can run pods, and on the way down makes
sure, by PID, that nothing it started is left behind.

State lives under one folder (``.cluster/`` in the repository by default, git-ignored):
``kubeconfig`` for users and tests, ``kwok/`` for kwokctl's work directory, ``node/`` for the
real node.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from localcluster.images import BuiltImage, Images
from localcluster.nodes import NodeSpec, default_nodes, node_manifest
from localcluster.processes import exited, is_ours, process_cmdline, stop_pids
from localcluster.realnode import (
    NodePaths,
    RealNode,
    RealNodeSpec,
    kwokctl_options,
    kwokctl_patches,
)
from localcluster.toolchain import Toolchain, default_cache_root, format_duration

DEFAULT_NAME = "modeldeploy"
READY_TIMEOUT_SECONDS = 120.0
LOOPBACK = "127.0.0.1"
SERVICE_RANGE = "10.96.0.0/16"
LOCAL_TAG = "local"  # every image of ours is also known to the node as <repository>:local


class ClusterError(RuntimeError):
    """Something about the local cluster went wrong; the message says what to do."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ClusterState:
    """Where one local cluster keeps its state."""

    root: Path
    name: str = DEFAULT_NAME

    @classmethod
    def default(cls) -> ClusterState:
        return cls(root=repo_root() / ".cluster")

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def kwok_workdir(self) -> Path:
        return self.root / "kwok"

    @property
    def cluster_dir(self) -> Path:
        return self.kwok_workdir / "clusters" / self.name

    @property
    def pid_dir(self) -> Path:
        return self.cluster_dir / "pids"

    @property
    def audit_policy(self) -> Path:
        return self.root / "audit-policy.yaml"

    @property
    def audit_log(self) -> Path:
        """The API server's audit log: one JSON event per line (every write, who made it;
        lists and watches of ModelDeployments)."""
        return self.root / "audit.log"

    @property
    def node_paths(self) -> NodePaths:
        return NodePaths.under(self.root, self.name)

    @property
    def operator_pid_file(self) -> Path:
        """The operator `make demo` leaves running, stopped with the cluster."""
        return self.root / "operator.pid"


@dataclass(frozen=True)
class Process:
    """A control-plane process kwokctl started, as recorded in its pid file."""

    component: str
    pid: int


def read_pid_files(pid_dir: Path) -> list[Process]:
    """Every ``<component>.pid`` file in ``pid_dir``; unreadable files are skipped."""
    if not pid_dir.is_dir():
        return []
    processes = []
    for path in sorted(pid_dir.glob("*.pid")):
        text = path.read_text().strip()
        if text.isdigit():
            processes.append(Process(component=path.stem, pid=int(text)))
    return processes


RESTART_ATTEMPTS = 5

# Every write, at the Metadata level (who, what, when, the answer's code): the fencing tests
# read it to see which process wrote after it lost its Lease. Of reads, only lists and watches
# of ModelDeployments: the 410 test times a reconcile from the list that found the object.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "verbs": ["create", "update", "patch", "delete", "deletecollection"]},
        {
            "level": "Metadata",
            "verbs": ["list", "watch"],
            "resources": [{"group": "serving.modeldeploy.io", "resources": ["modeldeployments"]}],
        },
        {"level": "None"},
    ],
}


def kwokctl_configuration(
    toolchain: Toolchain,
    real_node: RealNodeSpec | None = None,
    state: ClusterState | None = None,
) -> dict[str, Any]:
    """kwokctl's configuration: our binaries, run as processes, listening on 127.0.0.1 only
    (with a real node, the API server listens on the node's bridge address instead). With a
    ``state``, the API server writes an audit log there."""
    path = toolchain.path
    config: dict[str, Any] = {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokctlConfiguration",
        "options": {
            "runtime": "binary",
            "kubeVersion": toolchain.versions.kubernetes,  # selects the flags kwokctl passes
            "bindAddress": LOOPBACK,
            "etcdBinary": str(path("etcd")),
            "kubeApiserverBinary": str(path("kube-apiserver")),
            "kubeControllerManagerBinary": str(path("kube-controller-manager")),
            "kubeSchedulerBinary": str(path("kube-scheduler")),
            "kwokControllerBinary": str(path("kwok")),
            "kubectlBinary": str(path("kubectl")),
        },
        # The API server's default Service range is a /24: 254 Services, too few to benchmark
        # hundreds of ModelDeployments. kubeadm's default is a /12; a /16 is plenty here.
        "componentsPatches": [
            {
                "name": "kube-apiserver",
                "extraArgs": [{"key": "service-cluster-ip-range", "value": SERVICE_RANGE}],
            },
            # One of each, nothing to elect: without election they also ride out an API
            # server frozen past their renew deadline (the fault tests freeze it), where a
            # leader would exit, as it should where a kubelet restarts it; nothing does here.
            {
                "name": "kube-controller-manager",
                "extraArgs": [{"key": "leader-elect", "value": "false"}],
            },
            {
                "name": "kube-scheduler",
                "extraArgs": [{"key": "leader-elect", "value": "false"}],
            },
        ],
    }
    if state is not None:
        config["componentsPatches"][0]["extraArgs"] += [
            {"key": "audit-policy-file", "value": str(state.audit_policy)},
            {"key": "audit-log-path", "value": str(state.audit_log)},
            {"key": "audit-log-maxsize", "value": "200"},  # MB, then rotated once
            {"key": "audit-log-maxbackup", "value": "1"},
        ]
    if real_node is not None:
        config["options"] |= kwokctl_options(real_node)
        config["componentsPatches"] += kwokctl_patches(real_node)
    return config


class Cluster:
    """One local cluster: a toolchain (the binaries), a state folder and, optionally, a real
    node (a machine-wide singleton: only one cluster at a time can have one)."""

    def __init__(
        self,
        toolchain: Toolchain,
        state: ClusterState,
        out: TextIO = sys.stderr,
        *,
        real_node: RealNodeSpec | None = RealNodeSpec(),  # noqa: B008 - frozen dataclass
    ) -> None:
        self.toolchain = toolchain
        self.state = state
        self.out = out
        self.real_node_spec = real_node
        self.images: dict[str, BuiltImage] = {}

    @property
    def node(self) -> RealNode | None:
        """The real node, when this cluster has one."""
        if self.real_node_spec is None:
            return None
        return RealNode(
            self.real_node_spec,
            self.state.node_paths,
            cluster_name=self.state.name,
            bin_dir=self.toolchain.bin_dir,
            kubeconfig=self.state.kubeconfig,
            kubectl=self.kubectl,
            out=self.out,
        )

    def image_builder(self) -> Images:
        return Images(
            repo_root(),
            default_cache_root(os.environ),
            self.toolchain.versions.kubernetes,
            out=self.out,
        )

    def image(self, name: str) -> str:
        """The reference of one of our images (``operator``, ``runtime``, ``triton-cpu``),
        as the real node's containerd knows it; builds nothing when the cache is warm."""
        if name not in self.images:
            self.images = self.image_builder().ensure_built()
            node = self.node
            if node is not None and node.daemons():
                # A running node has the images of its start; the code may have changed since.
                self._import_images(node.paths.containerd_socket)
        return self.images[name].reference

    # -- observing -----------------------------------------------------------------------

    def processes(self) -> list[Process]:
        """The control-plane processes that are alive now."""
        marker = str(self.state.cluster_dir)
        return [p for p in read_pid_files(self.state.pid_dir) if is_ours(p.pid, marker)]

    def is_running(self) -> bool:
        """True when the API server answers ``/readyz``."""
        if not self.state.kubeconfig.is_file() or not self.processes():
            return False
        result = self.kubectl("get", "--raw", "/readyz", check=False, timeout=10)
        return result.returncode == 0 and result.stdout.strip() == "ok"

    # -- faults --------------------------------------------------------------------------

    def component_pid(self, component: str) -> int:
        """The pid of a live control-plane process (``kube-apiserver``, ``etcd``, ...)."""
        for process in self.processes():
            if process.component == component:
                return process.pid
        raise ClusterError(f"{component} is not running")

    def signal_component(self, component: str, sig: signal.Signals) -> None:
        """Send ``sig`` to a control-plane process: SIGSTOP freezes it, SIGCONT thaws it."""
        os.kill(self.component_pid(component), sig)

    def restart_component(self, component: str, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Kill a control-plane process (SIGKILL: no goodbye to its clients) and start it again
        as kwokctl did: same command line, folder, environment and log file; its pid file
        updated. For the API server, returns once it answers /readyz."""
        pid = self.component_pid(component)
        proc = Path(f"/proc/{pid}")
        argv = [a.decode() for a in proc.joinpath("cmdline").read_bytes().split(b"\0") if a]
        environ = dict(
            line.decode().split("=", 1)
            for line in proc.joinpath("environ").read_bytes().split(b"\0")
            if b"=" in line
        )
        cwd = proc.joinpath("cwd").resolve()
        log = proc.joinpath("fd", "1").resolve()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        # Gone for good: its command line empties while it still exits (memory first, then
        # its files, its listening socket among them), so wait for the end of the exit.
        while not exited(pid):
            if time.monotonic() > deadline:
                raise ClusterError(f"{component} (pid {pid}) did not die")
            time.sleep(0.05)
        for attempt in range(RESTART_ATTEMPTS):
            with log.open("ab") as out:
                started = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=environ,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            try:  # one that cannot bind its port yet (the kernel still closing the old
                started.wait(timeout=2)  # one's socket) exits at once: try again
            except subprocess.TimeoutExpired:
                break
            if attempt == RESTART_ATTEMPTS - 1:
                raise ClusterError(f"{component} exited {started.returncode}; see {log}")
            time.sleep(1)
        (self.state.pid_dir / f"{component}.pid").write_text(f"{started.pid}\n")
        if component == "kube-apiserver":
            try:
                self._wait_api_ready()
            except ClusterError as error:
                checks = self.kubectl("get", "--raw", "/readyz?verbose", check=False, timeout=10)
                alive = "running" if started.poll() is None else f"exited {started.returncode}"
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise ClusterError(
                    f"{error}\nthe restarted {component} ({alive}) says:\n"
                    f"{checks.stdout or checks.stderr}\nits log ends:\n{tail}"
                ) from error

    def audit_events(self) -> list[dict[str, Any]]:
        """Every write the API server has logged so far, and every list and watch of
        ModelDeployments (``audit.k8s.io/v1`` Events)."""
        if not self.state.audit_log.is_file():
            return []
        return [json.loads(line) for line in self.state.audit_log.read_text().splitlines() if line]

    def compact_etcd(self) -> int:
        """Compact etcd at its current revision: every older resourceVersion is gone from
        storage. Returns the revision."""
        revision = int(self._etcd("kv/range", {"key": "Lw==", "limit": 1})["header"]["revision"])
        self._etcd("kv/compaction", {"revision": revision, "physical": True})
        return revision

    def etcd_value(self, key: str) -> bytes | None:
        """What etcd holds at ``key`` (``/registry/<group>/<resource>/<namespace>/<name>``):
        how the API server stored an object, its storage version included."""
        found = self._etcd("kv/range", {"key": base64.b64encode(key.encode()).decode()})
        kvs = found.get("kvs") or []
        return base64.b64decode(kvs[0]["value"]) if kvs else None

    def _etcd(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One call to etcd's own v3 JSON gateway (its client URL, on this machine)."""
        cmdline = process_cmdline(self.component_pid("etcd")) or ""
        found = re.search(r"--advertise-client-urls=(\S+)", cmdline)
        if found is None:
            raise ClusterError(f"no client URL in etcd's command line: {cmdline}")
        url = found.group(1).split(",")[0]
        request = urllib.request.Request(  # noqa: S310 - etcd's URL, on this machine
            f"{url}/v3/{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            answer: dict[str, Any] = json.loads(response.read())
            return answer

    def env(self) -> dict[str, str]:
        """Environment for commands that should talk to this cluster with our binaries."""
        return {
            **os.environ,
            "KUBECONFIG": str(self.state.kubeconfig),
            "PATH": f"{self.toolchain.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def kubectl(
        self,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this cluster."""
        command = [str(self.toolchain.path("kubectl")), "--kubeconfig", str(self.state.kubeconfig)]
        return self._run([*command, *args], stdin=stdin, check=check, timeout=timeout)

    def wait_established(self, timeout: float = 60.0) -> None:
        """Wait for every CRD to be Established. ``kubectl wait`` fails at once on a CRD the
        API server has not yet given any condition ("status.conditions accessor error"), as
        right after it was applied: that one is asked again."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(1, int(deadline - time.monotonic()))
            result = self.kubectl(
                "wait",
                "--for=condition=Established",
                "crd",
                "--all",
                f"--timeout={left}s",
                check=False,
                timeout=left + 30,
            )
            if result.returncode == 0:
                return
            if "accessor error" not in result.stderr or time.monotonic() > deadline:
                raise ClusterError(f"CRDs not Established: {result.stderr.strip()}")
            time.sleep(0.5)

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the pinned helm against this cluster."""
        command = [str(self.toolchain.path("helm")), "--kubeconfig", str(self.state.kubeconfig)]
        return self._run([*command, *args], check=check, timeout=120)

    # -- starting and stopping -----------------------------------------------------------

    def up(self, nodes: Iterable[NodeSpec] | None = None) -> bool:
        """Start the cluster unless it is already running; True when this call started it."""
        if self.is_running():
            self._say(f"cluster {self.state.name!r} is already running")
            return False
        if self.state.cluster_dir.exists():
            self._say(
                f"found state of a cluster that is not running in {self.state.root}: removing"
            )
            self._teardown()
        self.toolchain.ensure_built(self.out)
        node = self.node
        if node is not None:
            node.check_prerequisites()
            self.images = self.image_builder().ensure_built()
        started = time.monotonic()
        version = self.toolchain.versions.kubernetes
        self._say(f"starting cluster {self.state.name!r} (Kubernetes {version})")
        self.state.root.mkdir(parents=True, exist_ok=True)
        try:
            if node is not None:
                node.network_up()
            self._kwokctl("create", "cluster", *self._create_flags(), timeout=READY_TIMEOUT_SECONDS)
            self._wait_api_ready()
            self._add_nodes(default_nodes() if nodes is None else tuple(nodes))
            self._wait_pods_admissible()
            if node is not None:
                node.up(self.images["pause"].reference, self._import_images)
        except BaseException:
            self._say("start failed; stopping what was started")
            self._teardown()
            raise
        self._say(
            f"cluster {self.state.name!r} is up in {format_duration(time.monotonic() - started)}"
        )
        return True

    def down(self) -> bool:
        """Stop every process of the cluster and remove its state; False when none was there."""
        if not self.state.root.exists():
            self._say(f"no local cluster in {self.state.root}: nothing to stop")
            return False
        stopped = self._teardown()
        self._say(f"stopped {len(stopped)} processes ({', '.join(stopped) or 'none running'})")
        self._say(f"removed {self.state.root}")
        return True

    def _import_images(self, socket: Path) -> None:
        """Our images into the node's containerd, each also as ``<repository>:local``: the
        stable name examples use (``localhost/modeldeploy-triton-cpu:local``)."""
        # The base is only built upon; no pod runs it.
        runnable = [image for name, image in self.images.items() if name != "base"]
        self.image_builder().import_into(runnable, "ctr", socket)
        for image in runnable:
            tag = [image.reference, f"{image.repository}:{LOCAL_TAG}"]
            self._run(
                ["ctr", "-a", str(socket), "-n", "k8s.io", "images", "tag", "--force", *tag],
                check=True,
                timeout=60,
            )

    def _teardown(self) -> list[str]:
        """Stop by PID everything recorded for this cluster, then remove the state folder."""
        node = self.node if self.state.node_paths.root.exists() else None
        if node is not None:
            api_up = bool(self.processes()) and self.state.kubeconfig.is_file()
            node.down(api_up=api_up)
        recorded = self.processes()
        # operator.pid, when `make demo` started one; its command line names our kubeconfig.
        operator = [
            p for p in read_pid_files(self.state.root) if is_ours(p.pid, str(self.state.root))
        ]
        stop_pids([p.pid for p in operator], lambda pid: is_ours(pid, str(self.state.root)))
        if self.state.cluster_dir.exists():
            # kwokctl stops its components gracefully; failures fall through to the PID sweep.
            self._kwokctl(
                "delete", "cluster", "--kubeconfig", str(self.state.kubeconfig), check=False
            )
        marker = str(self.state.cluster_dir)
        leftovers = stop_pids([p.pid for p in recorded], lambda pid: is_ours(pid, marker))
        if leftovers:
            self._say(f"killed processes kwokctl left running: {leftovers}")
        still = [p for p in recorded if is_ours(p.pid, marker)]
        if still:
            raise ClusterError(f"could not stop {still}; state kept in {self.state.root}")
        if node is not None:
            node.network_down()
        shutil.rmtree(self.state.root, ignore_errors=True)
        return [f"{p.component}={p.pid}" for p in [*operator, *recorded]]

    def _create_flags(self) -> list[str]:
        config = self.state.root / "kwokctl.yaml"
        configuration = kwokctl_configuration(self.toolchain, self.real_node_spec, self.state)
        config.write_text(yaml.safe_dump(configuration, sort_keys=False))
        self.state.audit_policy.write_text(yaml.safe_dump(AUDIT_POLICY, sort_keys=False))
        return [
            f"--config={config}",
            f"--kubeconfig={self.state.kubeconfig}",
            f"--timeout={int(READY_TIMEOUT_SECONDS)}s",
            "--wait=60s",
            "--quiet-pull",
        ]

    def _add_nodes(self, nodes: tuple[NodeSpec, ...]) -> None:
        text = yaml.safe_dump_all([node_manifest(n) for n in nodes], sort_keys=False)
        # `create`, not apply: the API server keeps a Node's status (its capacity) on create.
        self.kubectl("create", "-f", "-", stdin=text)
        self.kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=60s", timeout=90)
        self._say(f"added nodes: {', '.join(n.name for n in nodes)}")

    def _wait_api_ready(self) -> None:
        self._poll(
            "the API server to answer /readyz",
            lambda: (
                self.kubectl("get", "--raw", "/readyz", check=False, timeout=10).stdout.strip()
                == "ok"
            ),
        )

    def _wait_pods_admissible(self) -> None:
        # Pods are rejected until kube-controller-manager has made the default ServiceAccount.
        self._poll(
            "the default ServiceAccount",
            lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
        )

    def _poll(self, what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not done():
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"timed out after {int(READY_TIMEOUT_SECONDS)}s waiting for {what};"
                    f" logs are in {self.state.cluster_dir / 'logs'}"
                )
            time.sleep(0.5)

    def _kwokctl(self, *args: str, check: bool = True, timeout: float = 120) -> None:
        env = {**os.environ, "KWOK_WORKDIR": str(self.state.kwok_workdir)}
        command = [str(self.toolchain.path("kwokctl")), f"--name={self.state.name}", *args]
        self._run(command, env=env, check=check, timeout=timeout)

    def _run(
        self,
        command: list[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        check: bool,
        timeout: float,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            command,
            input=stdin,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            name = Path(command[0]).name
            detail = (result.stderr or result.stdout).strip()
            raise ClusterError(f"`{name} {' '.join(command[1:4])} ...` failed: {detail}")
        return result

    def _say(self, message: str) -> None:
        print(f"[cluster] {message}", file=self.out, flush=True)
