"""The control plane itself: every binary reports the pinned release, so version checks
(kubectl skew, Helm's ``kubeVersion``) see the real Kubernetes version, and every process
listens on 127.0.0.1 only, or, with the real node, on the node's own bridge address."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import yaml

from localcluster import Cluster

pytestmark = pytest.mark.cluster


def test_server_and_kubectl_report_the_pinned_version(cluster: Cluster) -> None:
    pinned = cluster.toolchain.versions.kubernetes
    report = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert report["serverVersion"]["gitVersion"] == pinned
    assert report["clientVersion"]["gitVersion"] == pinned
    major, minor = int(report["serverVersion"]["major"]), int(report["serverVersion"]["minor"])
    assert (major, minor) >= (1, 31)


def test_helm_reports_its_version_and_sees_the_server_version(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    helm_version = cluster.helm("version", "--template", "{{ .Version }}").stdout.strip()
    assert helm_version == cluster.toolchain.versions.helm

    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        yaml.safe_dump(
            {"apiVersion": "v2", "name": "probe", "version": "0.1.0", "kubeVersion": ">=1.31.0-0"}
        )
    )
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: probe\n"
        "data:\n  kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}\n"
    )
    rendered = cluster.helm(
        "install", "probe", str(chart), "--namespace", namespace, "--dry-run=server"
    ).stdout
    manifest = yaml.safe_load(rendered.split("MANIFEST:", 1)[1].split("---", 1)[1])
    assert manifest["data"]["kubeVersion"] == cluster.toolchain.versions.kubernetes


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` listens on, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = str(fd.readlink())
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address, port = local.split(":")
                found.add((address, int(port, 16)))
    return found


def proc_address(ip: str) -> str:
    """An IPv4 address as /proc/net/tcp writes it (little-endian hex)."""
    return ipaddress.IPv4Address(ip).packed[::-1].hex().upper()


def test_proc_address() -> None:
    assert proc_address("127.0.0.1") == "0100007F"
    assert proc_address("172.30.0.1") == "01001EAC"


def test_every_process_listens_on_loopback_or_the_node_bridge_only(cluster: Cluster) -> None:
    """Never on 0.0.0.0 or an uplink's address. With the real node, the API server listens
    on the node's bridge address (pods reach it through the kubernetes Service), and so do
    the kubelet and Prometheus; the traffic guard drops those addresses on the uplinks."""
    allowed = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    node = cluster.node
    processes = [(p.component, p.pid) for p in cluster.processes()]
    assert len(processes) == 5
    if node is not None:
        allowed.add(proc_address(node.spec.node_ip))
        processes += [(d.name, d.pid) for d in node.daemons()]
        assert {name for name, _ in processes} >= {"containerd", "kubelet", "kube-proxy"}
    for component, pid in processes:
        sockets = listening_sockets(pid)
        if component == "containerd":
            assert {address for address, _ in sockets} <= allowed, (component, sockets)
            continue  # its gRPC is a unix socket; the CRI stream server is on loopback
        assert sockets, f"{component} listens on nothing"
        assert {address for address, _ in sockets} <= allowed, (component, sockets)
