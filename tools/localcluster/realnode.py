"""A real node beside the simulated ones: a kubelet whose pods run in containerd with runc.

What runs (all as plain processes, recorded by PID, stopped by :meth:`RealNode.down`):

- **containerd** (Debian's package) with its own config, root, state and socket, so it never
  meets another containerd on the machine; runc v2 with cgroupfs; the pause image compiled
  here (no registry is reachable).
- **kubelet**, built from the same pinned Kubernetes module as the control plane, registered
  as a GPU node: GPU feature discovery's labels for its product, the GPU taint, and
  ``nvidia.com/gpu`` capacity written into the Node's status (no device plugin: pods with GPU
  limits are admitted and run on CPU).
- **CNI bridge networking** (Debian's ``containernetworking-plugins``): one bridge, host-local
  addresses from :attr:`RealNodeSpec.pod_cidr`, portmap.
- **kube-proxy** (iptables mode) for ClusterIP Services, from the host and from pods.

Traffic stays on the machine: an nftables table drops anything forwarded to or from the
uplinks (the interfaces that carry a default route), and input from them to the node, pod and
Service addresses and the kubelet and API ports. The API server listens on the node address
(so pods reach it through the ``kubernetes`` Service); a DNAT rule keeps ``127.0.0.1:6443``,
which every kubeconfig names, working from the host.

The configuration files are built by pure functions (unit-tested); :class:`RealNode` does the
I/O. The node is a machine-wide singleton: one bridge address, one API port, and the kubelet's
fixed paths (``/var/lib/kubelet/device-plugins``, ``/var/log/pods``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from localcluster.nodes import GPU_RESOURCE, GPU_TAINT, Gpu
from localcluster.processes import is_ours, processes_mentioning, stop_pids
from localcluster.toolchain import format_duration

L4 = Gpu(product="NVIDIA-L4", memory_mib=23034, family="ada-lovelace")
REAL_NODE_LABEL = "modeldeploy.io/real-node"
# Only pods that ask for the real node land there; the simulated tier stays as it was.
REAL_NODE_TAINT: dict[str, str] = {"key": REAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"}
SERVICE_CIDR = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"
START_TIMEOUT_SECONDS = 90.0
# Debian packages that provide what the node runs; named in the error when one is missing.
PACKAGES = {
    "containerd": "containerd",
    "runc": "runc",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "iptables": "iptables",
    "nft": "nftables",
    "ip": "iproute2",
}
# Paths the kubelet writes outside its --root-dir, removed on the way down.
KUBELET_FIXED_PATHS = (
    Path("/var/lib/kubelet"),
    Path("/var/lib/kubelet/device-plugins"),
    Path("/var/log/pods"),
    Path("/var/log/containers"),
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"  # on while a pod bridge is up (isGateway)


# Run by RealNode.oom_kill: join a memory cgroup (argv[1]'s cgroup.procs), take argv[2] bytes
# (written, so charged) and wait to be ended.
MEMORY_HOG = """
import os, sys, time
with open(sys.argv[1], "w") as procs:
    procs.write(str(os.getpid()))
held = [bytearray(b"\\1" * (1 << 20)) for _ in range(int(sys.argv[2]) >> 20)]
time.sleep(600)
"""


def memory_cgroup(pid: int) -> Path:
    """The folder of a process's memory cgroup (cgroup v1, as the real node runs)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / "memory" / path.lstrip("/")
    raise NodeError(f"process {pid} has no memory cgroup (cgroup v2 is not supported here)")


class NodeError(RuntimeError):
    """The real node could not be started or stopped; the message says what to do."""


@dataclass(frozen=True)
class RealNodeSpec:
    """One real node and its networks."""

    name: str = "real-0"
    node_ip: str = "172.30.0.1"
    node_bridge: str = "mdnode0"
    pod_cidr: str = "10.244.0.0/24"
    pod_bridge: str = "mdcni0"
    gpu: Gpu = L4
    gpu_count: int = 4
    max_pods: int = 40
    api_port: int = 6443
    kubelet_port: int = 10250

    @property
    def pod_gateway(self) -> str:
        network = self.pod_cidr.split("/", 1)[0].rsplit(".", 1)[0]
        return f"{network}.1"


@dataclass(frozen=True)
class NodePaths:
    """Where the node keeps its state: configs and data under the cluster's state folder,
    sockets and runtime state under ``/run`` (a unix socket path must stay short)."""

    root: Path
    run: Path

    @classmethod
    def under(cls, state_root: Path, cluster_name: str) -> NodePaths:
        return cls(root=state_root / "node", run=Path("/run/modeldeploy") / cluster_name)

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd" / "config.toml"

    @property
    def containerd_root(self) -> Path:
        return self.root / "containerd" / "root"

    @property
    def containerd_state(self) -> Path:
        return self.run / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def cni_data_dir(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet-config.yaml"

    @property
    def kube_proxy_config(self) -> Path:
        return self.root / "kube-proxy-config.yaml"

    @property
    def resolv_conf(self) -> Path:
        return self.root / "resolv.conf"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def created_paths_file(self) -> Path:
        """The kubelet's fixed paths that did not exist before the node started."""
        return self.root / "created-paths.json"


# -- pure configuration builders -------------------------------------------------------------


def containerd_config(paths: NodePaths, pause_image: str) -> str:
    """containerd 1.6's config (version 2): our own root, state and socket; CRI with runc."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    lines = [
        "version = 2",
        f'root = "{paths.containerd_root}"',
        f'state = "{paths.containerd_state}"',
        "",
        "[grpc]",
        f'  address = "{paths.containerd_socket}"',
        "",
        "[ttrpc]",
        f'  address = "{paths.containerd_socket}.ttrpc"',
        "",
        f"[{cri}]",
        f'  sandbox_image = "{pause_image}"',
        # root here lacks CAP_SYS_RESOURCE: without this every sandbox fails with
        # "can't get final child's PID from pipe: EOF".
        "  restrict_oom_score_adj = true",
        '  stream_server_address = "127.0.0.1"',
        '  stream_server_port = "0"',
        "  enable_selinux = false",
        "",
        f"[{cri}.containerd]",
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        "",
        f"[{cri}.containerd.runtimes.runc]",
        '  runtime_type = "io.containerd.runc.v2"',
        "",
        f"[{cri}.containerd.runtimes.runc.options]",
        '  BinaryName = "runc"',
        "  SystemdCgroup = false",
        "",
        f"[{cri}.cni]",
        '  bin_dir = "/usr/lib/cni"',
        f'  conf_dir = "{paths.cni_conf_dir}"',
        "",
    ]
    return "\n".join(lines)


def cni_conflist(spec: RealNodeSpec, paths: NodePaths) -> dict[str, Any]:
    """A bridge with host-local addresses, then portmap; containerd adds loopback itself."""
    return {
        "cniVersion": "1.0.0",
        "name": "modeldeploy",
        "plugins": [
            {
                "type": "bridge",
                "bridge": spec.pod_bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": spec.pod_cidr, "gateway": spec.pod_gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(paths.cni_data_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def node_labels(spec: RealNodeSpec) -> dict[str, str]:
    """The labels GPU feature discovery would set, so GPU scheduling runs unchanged."""
    return {
        REAL_NODE_LABEL: "true",
        "node.kubernetes.io/instance-type": "gpu",
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": spec.gpu.product,
        "nvidia.com/gpu.count": str(spec.gpu_count),
        "nvidia.com/gpu.memory": str(spec.gpu.memory_mib),
        "nvidia.com/gpu.family": spec.gpu.family,
        "nvidia.com/gpu.machine": "modeldeploy-real-node",
    }


def kubelet_configuration(spec: RealNodeSpec, paths: NodePaths) -> dict[str, Any]:
    """The KubeletConfiguration: bound to the node address only, cgroupfs on cgroup v1."""
    socket = f"unix://{paths.containerd_socket}"
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": spec.node_ip,
        "port": spec.kubelet_port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 0,
        # The API server calls the kubelet without a client certificate; the kubelet listens on
        # the node bridge only, and the guard drops the port on the uplinks.
        "authentication": {
            "anonymous": {"enabled": True},
            "webhook": {"enabled": False},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "containerRuntimeEndpoint": socket,
        "imageServiceEndpoint": socket,
        "resolvConf": str(paths.resolv_conf),
        # No cluster DNS runs (and nothing resolves off the machine): pods reach Services by
        # address. A cluster DNS address keeps the kubelet from warning on every pod.
        "clusterDNS": ["127.0.0.1"],
        "clusterDomain": "cluster.local",
        "registerNode": True,
        "registerWithTaints": [dict(GPU_TAINT), dict(REAL_NODE_TAINT)],
        "maxPods": spec.max_pods,
        "podCIDR": spec.pod_cidr,
        # Images are imported, never pulled: never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "serializeImagePulls": False,
        "nodeStatusUpdateFrequency": "5s",
        "shutdownGracePeriod": "0s",
        "localStorageCapacityIsolation": True,
    }


def kubelet_args(
    spec: RealNodeSpec, paths: NodePaths, kubelet: Path, kubeconfig: Path
) -> list[str]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(node_labels(spec).items()))
    return [
        str(kubelet),
        f"--config={paths.kubelet_config}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={paths.kubelet_root}",
        f"--cert-dir={paths.kubelet_root / 'pki'}",
        f"--hostname-override={spec.name}",
        f"--node-ip={spec.node_ip}",
        f"--node-labels={labels}",
    ]


def kube_proxy_configuration(spec: RealNodeSpec, kubeconfig: Path) -> dict[str, Any]:
    """kube-proxy in iptables mode; health and metrics on loopback; conntrack left alone."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": spec.name,
        "clusterCIDR": spec.pod_cidr,
        "bindAddress": spec.node_ip,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "mode": "iptables",
        "nodePortAddresses": [f"{spec.node_ip}/32"],
        "iptables": {"localhostNodePorts": False},
        # Zero leaves the kernel's conntrack settings as they are.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


def guard_table_name(cluster_name: str) -> str:
    return f"modeldeploy_{cluster_name}".replace("-", "_")


def nft_guard(spec: RealNodeSpec, cluster_name: str, uplinks: Sequence[str]) -> str:
    """nftables rules that keep the cluster's traffic on this machine, both ways.

    - nothing is forwarded to or from an uplink (pods never leave the machine);
    - local packets to pod or Service addresses never leave by an uplink;
    - nothing from an uplink reaches the node, pod or Service addresses, the API server or
      the kubelet;
    - ``127.0.0.1:<api port>`` (every kubeconfig's address) is sent to the node address,
      where the API server listens so that pods reach it too.
    """
    table = guard_table_name(cluster_name)
    inner = f"{{ {spec.node_ip}, {spec.pod_cidr}, {SERVICE_CIDR} }}"
    ports = f"{{ {spec.api_port}, {spec.kubelet_port} }}"
    lines = [f"table inet {table} {{"]
    lines += [
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
    ]
    for uplink in uplinks:
        lines += [f'    iifname "{uplink}" drop', f'    oifname "{uplink}" drop']
    lines += ["  }", "  chain output {", "    type filter hook output priority filter;"]
    lines[-1] += " policy accept;"
    for uplink in uplinks:
        lines += [
            f'    oifname "{uplink}" ip daddr {{ {spec.pod_cidr}, {SERVICE_CIDR} }} drop',
            f'    oifname "{uplink}" ip saddr {{ {spec.node_ip}, {spec.pod_cidr} }} drop',
        ]
    lines += ["  }", "  chain input {", "    type filter hook input priority filter;"]
    lines[-1] += " policy accept;"
    for uplink in uplinks:
        lines += [
            f'    iifname "{uplink}" ip daddr {inner} drop',
            f'    iifname "{uplink}" tcp dport {ports} drop',
        ]
    lines += [
        "  }",
        "  chain nat_output {",
        "    type nat hook output priority -100; policy accept;",
        f"    ip daddr 127.0.0.1 tcp dport {spec.api_port} dnat ip to"
        f" {spec.node_ip}:{spec.api_port}",
        "  }",
        "}",
        "",
    ]
    return "\n".join(lines)


def kwokctl_patches(spec: RealNodeSpec) -> list[dict[str, Any]]:
    """Component flags for a cluster with a real node (pflag: the last value wins).

    - the API server listens and advertises on the node address, so the ``kubernetes``
      Service leads pods to it; it reaches kubelets by IP, never by a DNS lookup;
    - the kwok controller manages only the simulated nodes (by their annotation), never the
      real one (it would take over its Lease and status).
    """

    def args(pairs: dict[str, str]) -> list[dict[str, str]]:
        return [{"key": key, "value": value} for key, value in pairs.items()]

    return [
        {
            "name": "kube-apiserver",
            "extraArgs": args(
                {
                    "bind-address": spec.node_ip,
                    "advertise-address": spec.node_ip,
                    "kubelet-preferred-address-types": "InternalIP,Hostname",
                }
            ),
        },
        {
            "name": "kwok-controller",
            "extraArgs": args(
                {
                    "manage-all-nodes": "false",
                    "manage-nodes-with-annotation-selector": "kwok.x-k8s.io/node=fake",
                }
            ),
        },
    ]


def kwokctl_options(spec: RealNodeSpec) -> dict[str, Any]:
    """kwokctl options for a cluster with a real node: a fixed API port (kwokctl's automatic
    ports count down from 32767 and may collide) and a certificate valid for the addresses
    pods use."""
    return {
        "kubeApiserverPort": spec.api_port,
        "kubeApiserverCertSANs": [API_SERVICE_IP, spec.node_ip],
    }


def kube_chain_cleanup(rules: str) -> list[list[str]]:
    """``iptables -S`` output -> the arguments that remove every ``KUBE-*`` chain the kubelet
    and kube-proxy made: first the rules that jump to one (from any chain), then each chain's
    rules and the chain itself."""
    deletes: list[list[str]] = []
    chains: list[str] = []
    for line in rules.splitlines():
        parts = shlex.split(line)
        if len(parts) >= 2 and parts[0] == "-N" and parts[1].startswith("KUBE-"):
            chains.append(parts[1])
        elif (
            len(parts) >= 2
            and parts[0] == "-A"
            and not parts[1].startswith("KUBE-")
            and any(p.startswith("KUBE-") for p in parts[2:])
        ):
            deletes.append(["-D", *parts[1:]])
    for chain in chains:
        deletes.append(["-F", chain])
    deletes += [["-X", chain] for chain in chains]
    return deletes


def uplinks_of(routes: Iterable[dict[str, Any]]) -> list[str]:
    """The interfaces that carry a default route (``ip -j route show default``)."""
    return sorted({route["dev"] for route in routes if route.get("dev")})


def mounts_under(mountinfo: str, prefixes: Sequence[str]) -> list[str]:
    """Mount points under any of ``prefixes`` (a folder, or a name prefix ending in ``-``),
    deepest first (unmount order)."""

    def under(point: str, prefix: str) -> bool:
        if prefix.endswith("-"):
            return point.startswith(prefix)
        return point == prefix or point.startswith(prefix.rstrip("/") + "/")

    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            point = fields[4].replace("\\040", " ")
            if any(under(point, p) for p in prefixes):
                found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


# -- the node --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Daemon:
    name: str
    pid: int


class RealNode:
    """Start and stop one real node. ``kubectl`` runs the pinned kubectl against the cluster."""

    def __init__(
        self,
        spec: RealNodeSpec,
        paths: NodePaths,
        *,
        cluster_name: str,
        bin_dir: Path,
        kubeconfig: Path,
        kubectl: Callable[..., subprocess.CompletedProcess[str]],
        out: TextIO = sys.stderr,
    ) -> None:
        self.spec = spec
        self.paths = paths
        self.cluster_name = cluster_name
        self.bin_dir = bin_dir
        self.kubeconfig = kubeconfig
        self.kubectl = kubectl
        self.out = out

    # -- checks ------------------------------------------------------------------------------

    @staticmethod
    def missing_prerequisites() -> list[str]:
        """Debian packages whose programs are missing, plus "root" when not root."""
        missing = []
        for program, package in PACKAGES.items():
            found = Path(program).exists() if program.startswith("/") else shutil.which(program)
            if not found:
                missing.append(package)
        return missing

    def check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise NodeError("the real node needs root (containerd, kubelet, network namespaces)")
        missing = self.missing_prerequisites()
        if missing:
            raise NodeError(
                f"the real node needs Debian packages {' '.join(missing)}:"
                f" apt-get install {' '.join(missing)} (or `make deps`)"
            )

    # -- networking (before the control plane starts) -------------------------------------

    def network_up(self) -> None:
        """The node bridge with the node address, the guard and the API DNAT, the Service
        route. Idempotent."""
        spec = self.spec
        self.paths.root.mkdir(parents=True, exist_ok=True)
        if not Path(f"/sys/class/net/{spec.node_bridge}").exists():
            _run(["ip", "link", "add", spec.node_bridge, "type", "bridge"])
        _run(["ip", "addr", "replace", f"{spec.node_ip}/32", "dev", spec.node_bridge])
        _run(["ip", "link", "set", spec.node_bridge, "up"])
        _run(["ip", "route", "replace", SERVICE_CIDR, "dev", spec.node_bridge])
        routes = json.loads(_run(["ip", "-j", "route", "show", "default"]).stdout or "[]")
        uplinks = [u for u in uplinks_of(routes) if u not in (spec.node_bridge, spec.pod_bridge)]
        table = guard_table_name(self.cluster_name)
        _run(["nft", "delete", "table", "inet", table], check=False)
        _run(["nft", "-f", "-"], stdin=nft_guard(spec, self.cluster_name, uplinks))

    def network_down(self) -> None:
        spec = self.spec
        _run(["nft", "delete", "table", "inet", guard_table_name(self.cluster_name)], check=False)
        _run(["ip", "route", "del", SERVICE_CIDR, "dev", spec.node_bridge], check=False)
        for bridge in (spec.pod_bridge, spec.node_bridge):
            if Path(f"/sys/class/net/{bridge}").exists():
                _run(["ip", "link", "del", bridge], check=False)
        # Off, not "as it was": a value recorded at start-up can be another cluster's (a state
        # folder whose stop failed left it on, and this node recorded 1 as the original).
        with contextlib.suppress(OSError):
            Path(IP_FORWARD).write_text("0\n")

    # -- daemons -----------------------------------------------------------------------------

    def up(self, pause_image: str, import_images: Callable[[Path], None]) -> None:
        """containerd (images imported by ``import_images(socket)``), kubelet, kube-proxy."""
        started = time.monotonic()  # Cluster.up checked the prerequisites before any build
        paths = self.paths
        for folder in (paths.logs, paths.pids, paths.cni_conf_dir, paths.cni_data_dir, paths.run):
            folder.mkdir(parents=True, exist_ok=True)
        created = [str(p) for p in KUBELET_FIXED_PATHS if not p.exists()]
        if not paths.created_paths_file.exists():
            paths.created_paths_file.write_text(json.dumps(created))
        paths.resolv_conf.write_text("nameserver 127.0.0.1\n")
        paths.containerd_config.parent.mkdir(parents=True, exist_ok=True)
        paths.containerd_config.write_text(containerd_config(paths, pause_image))
        (paths.cni_conf_dir / "10-modeldeploy.conflist").write_text(
            json.dumps(cni_conflist(self.spec, paths), indent=2)
        )
        self._start("containerd", ["containerd", f"--config={paths.containerd_config}"])
        self._wait("containerd's socket", paths.containerd_socket.exists)
        import_images(paths.containerd_socket)

        paths.kubelet_config.write_text(
            yaml.safe_dump(kubelet_configuration(self.spec, paths), sort_keys=False)
        )
        kubelet = self.bin_dir / "kubelet"
        self._start("kubelet", kubelet_args(self.spec, paths, kubelet, self.kubeconfig))
        self._wait("the node to register", self._node_exists)
        self.kubectl(
            "wait", "--for=condition=Ready", f"node/{self.spec.name}", "--timeout=90s", timeout=100
        )
        self._advertise_gpus()

        paths.kube_proxy_config.write_text(
            yaml.safe_dump(kube_proxy_configuration(self.spec, self.kubeconfig), sort_keys=False)
        )
        self._start(
            "kube-proxy",
            [str(self.bin_dir / "kube-proxy"), f"--config={paths.kube_proxy_config}"],
        )
        self._wait("kube-proxy's health endpoint", _kube_proxy_healthy)
        self._say(
            f"real node {self.spec.name} ({self.spec.node_ip}, pods {self.spec.pod_cidr},"
            f" {self.spec.gpu_count}x {self.spec.gpu.product}) is Ready"
            f" in {format_duration(time.monotonic() - started)}"
        )

    def _advertise_gpus(self) -> None:
        """Fake ``nvidia.com/gpu`` capacity in the Node's status; the kubelet keeps it and
        copies it into allocatable on its next status update."""
        resource = GPU_RESOURCE.replace("/", "~1")
        patch = [
            {"op": "add", "path": f"/status/capacity/{resource}", "value": str(self.spec.gpu_count)}
        ]
        self.kubectl(
            "patch",
            "node",
            self.spec.name,
            "--subresource=status",
            "--type=json",
            "-p",
            json.dumps(patch),
        )
        self._wait("the kubelet to make the GPUs allocatable", self._gpus_allocatable)

    def _gpus_allocatable(self) -> bool:
        result = self.kubectl(
            "get",
            "node",
            self.spec.name,
            "-o",
            "jsonpath={.status.allocatable.nvidia\\.com/gpu}",
            check=False,
        )
        return result.stdout.strip() == str(self.spec.gpu_count)

    def _node_exists(self) -> bool:
        return self.kubectl("get", "node", self.spec.name, check=False).returncode == 0

    def daemons(self) -> list[Daemon]:
        """The node's daemons that are alive now."""
        out = []
        if self.paths.pids.is_dir():
            for path in sorted(self.paths.pids.glob("*.pid")):
                text = path.read_text().strip()
                if text.isdigit() and is_ours(int(text), str(self.paths.root)):
                    out.append(Daemon(path.stem, int(text)))
        return out

    def _start(self, name: str, command: list[str]) -> None:
        log = (self.paths.logs / f"{name}.log").open("ab")
        with log:
            proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        (self.paths.pids / f"{name}.pid").write_text(f"{proc.pid}\n")
        time.sleep(0.2)
        if proc.poll() is not None:
            raise NodeError(f"{name} exited at start; see {self.paths.logs / f'{name}.log'}")

    def _wait(self, what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not done():
            for daemon in ("containerd", "kubelet", "kube-proxy"):
                pid_file = self.paths.pids / f"{daemon}.pid"
                if pid_file.exists() and daemon not in {d.name for d in self.daemons()}:
                    raise NodeError(f"{daemon} died; see {self.paths.logs / f'{daemon}.log'}")
            if time.monotonic() > deadline:
                raise NodeError(f"timed out waiting for {what}; logs are in {self.paths.logs}")
            time.sleep(0.3)

    # -- stopping ----------------------------------------------------------------------------

    def down(self, api_up: bool) -> None:
        """Stop everything the node started and undo what it changed on the machine.

        Pods are removed through the kubelet first when the API server still answers (so CNI
        releases their addresses); whatever is left is killed by cgroup and unmounted.
        """
        if api_up and self._node_exists():
            self._drain()
        daemons = {d.name: d.pid for d in self.daemons()}
        marker = str(self.paths.root)
        if "kube-proxy" in daemons:
            stop_pids([daemons["kube-proxy"]], lambda pid: is_ours(pid, marker))
        proxy = self.bin_dir / "kube-proxy"
        if proxy.exists() and self.paths.kube_proxy_config.exists():
            _run([str(proxy), "--cleanup", f"--config={self.paths.kube_proxy_config}"], check=False)
        if "kubelet" in daemons:
            stop_pids([daemons["kubelet"]], lambda pid: is_ours(pid, marker))
        _remove_kube_chains()
        if "containerd" in daemons:
            self._kill_tasks()
            stop_pids([daemons["containerd"]], lambda pid: is_ours(pid, marker))
        self._kill_pods_by_cgroup()
        for pid in processes_mentioning(str(self.paths.run)):  # orphaned shims
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self._unmount()
        self._remove_pod_cgroups()
        self._remove_fixed_paths()
        if api_up:
            self.kubectl("delete", "node", self.spec.name, "--wait=false", check=False)
        shutil.rmtree(self.paths.run, ignore_errors=True)
        with contextlib.suppress(OSError):  # /run/modeldeploy, when no other cluster uses it
            self.paths.run.parent.rmdir()

    def _drain(self) -> None:
        """Cordon, delete every pod on the node, and give the kubelet a moment to tear
        their sandboxes down."""
        self.kubectl("cordon", self.spec.name, check=False)
        self.kubectl(
            "delete",
            "pods",
            "--all-namespaces",
            f"--field-selector=spec.nodeName={self.spec.name}",
            "--grace-period=1",
            "--wait=false",
            check=False,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self._sandboxes():
            time.sleep(0.5)

    def _ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run(
            ["ctr", "-a", str(self.paths.containerd_socket), "-n", "k8s.io", *args], check=False
        )

    def _sandboxes(self) -> list[str]:
        if not self.paths.containerd_socket.exists():
            return []
        return self._ctr("tasks", "ls", "-q").stdout.split()

    def _kill_tasks(self) -> None:
        for task in self._sandboxes():
            self._ctr("tasks", "kill", "-a", "-s", "SIGKILL", task)
        for task in self._sandboxes():
            self._ctr("tasks", "delete", "-f", task)

    def _kill_pods_by_cgroup(self) -> None:
        for procs in CGROUP_ROOT.glob("*/kubepods/**/cgroup.procs"):
            with contextlib.suppress(OSError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(int(pid), signal.SIGKILL)

    def _unmount(self) -> None:
        prefixes = [str(self.paths.root), str(self.paths.run), "/run/netns/cni-"]
        mountinfo = Path("/proc/self/mountinfo").read_text()
        for point in mounts_under(mountinfo, prefixes):
            _run(["umount", "-l", point], check=False)
        # CNI's netns files are bind mounts of themselves; the prefix above caught them.
        for netns in Path("/run/netns").glob("cni-*"):
            with contextlib.suppress(OSError):
                netns.unlink()

    # -- faults, for tests ---------------------------------------------------------------

    def container_pid(self, container_id: str) -> int:
        """The host pid of a running container's first process; ``container_id`` as a pod's
        ``containerStatuses[].containerID`` has it (``containerd://<id>``) or bare."""
        bare = container_id.removeprefix("containerd://")
        for line in self._ctr("tasks", "ls").stdout.splitlines()[1:]:
            task, pid, *_ = line.split()
            if task == bare:
                return int(pid)
        raise NodeError(f"no running task {bare} in containerd")

    def oom_kill(self, container_id: str, timeout: float = 30.0) -> None:
        """Have the kernel's OOM killer end a container's process, as a leak would: a process
        of ours joins the container's memory cgroup and takes what the limit leaves plus half
        of what the container uses. The kernel kills the container's process, the OOM
        killer's first choice (``oom_score_adj`` 1000: the kubelet gives a burstable pod's
        processes nearly that already, we make sure); containerd sees the cgroup's OOM event,
        and the kubelet reports ``OOMKilled``. Ours, which alone fits, is then ended."""
        pid = self.container_pid(container_id)
        Path(f"/proc/{pid}/oom_score_adj").write_text("1000")
        memory = memory_cgroup(pid)
        limit = int((memory / "memory.limit_in_bytes").read_text())
        usage = int((memory / "memory.usage_in_bytes").read_text())
        if limit >= 1 << 50:
            raise NodeError(f"container {container_id} has no memory limit to exceed")
        hog = subprocess.Popen(
            [
                sys.executable,
                "-c",
                MEMORY_HOG,
                str(memory / "cgroup.procs"),
                str(limit - usage // 2),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + timeout
            while Path(f"/proc/{pid}").exists():
                if hog.poll() is not None:
                    raise NodeError(
                        f"the memory hog ended first: {hog.stderr and hog.stderr.read()!r}"
                    )
                if time.monotonic() > deadline:
                    raise NodeError(f"container {container_id} was not OOM-killed in {timeout:g} s")
                time.sleep(0.1)
        finally:
            hog.kill()
            hog.wait()

    def _remove_pod_cgroups(self) -> None:
        for top in CGROUP_ROOT.glob("*/kubepods"):
            folders = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for folder in [*folders, top]:
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def _remove_fixed_paths(self) -> None:
        if not self.paths.created_paths_file.exists():
            return
        for created in json.loads(self.paths.created_paths_file.read_text()):
            shutil.rmtree(created, ignore_errors=True)

    def _say(self, message: str) -> None:
        print(f"[node] {message}", file=self.out, flush=True)


def _remove_kube_chains() -> None:
    for program in ("iptables", "ip6tables"):
        if shutil.which(program) is None:
            continue
        for table in ("filter", "nat", "mangle"):
            listed = _run([program, "-t", table, "-S"], check=False)
            for args in kube_chain_cleanup(listed.stdout):
                _run([program, "-t", table, *args], check=False)


def _kube_proxy_healthy() -> bool:
    try:
        with urllib.request.urlopen("http://127.0.0.1:10256/healthz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _run(
    command: list[str], *, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command, input=stdin, capture_output=True, text=True, check=False, timeout=60
    )
    if check and result.returncode != 0:
        raise NodeError(
            f"`{' '.join(command[:4])}` failed: {(result.stderr or result.stdout).strip()}"
        )
    return result
