"""The real node's configuration, as pure data: what containerd, the kubelet, kube-proxy, CNI
and the traffic guard are told."""

from __future__ import annotations

from pathlib import Path

from localcluster.realnode import (
    API_SERVICE_IP,
    SERVICE_CIDR,
    NodePaths,
    RealNodeSpec,
    cni_conflist,
    containerd_config,
    kube_chain_cleanup,
    kube_proxy_configuration,
    kubelet_args,
    kubelet_configuration,
    kwokctl_options,
    kwokctl_patches,
    mounts_under,
    nft_guard,
    node_labels,
    uplinks_of,
)

SPEC = RealNodeSpec()
PATHS = NodePaths.under(Path("/state"), "modeldeploy")


def test_containerd_has_its_own_root_state_and_socket_and_restricts_oom_score() -> None:
    text = containerd_config(PATHS, "localhost/modeldeploy-pause:abc")
    assert 'root = "/state/node/containerd/root"' in text
    assert 'state = "/run/modeldeploy/modeldeploy/containerd"' in text
    assert 'address = "/run/modeldeploy/modeldeploy/containerd.sock"' in text
    assert 'sandbox_image = "localhost/modeldeploy-pause:abc"' in text
    assert "restrict_oom_score_adj = true" in text
    assert "SystemdCgroup = false" in text
    assert 'conf_dir = "/state/node/cni/net.d"' in text
    # A unix socket path must fit in sun_path (108 bytes).
    assert len(str(PATHS.containerd_socket)) < 100


def test_cni_bridge_is_a_gateway_without_masquerade_and_keeps_addresses_in_the_state() -> None:
    bridge, portmap = cni_conflist(SPEC, PATHS)["plugins"]
    assert bridge["type"] == "bridge"
    assert bridge["bridge"] == SPEC.pod_bridge
    assert bridge["isGateway"] is True
    assert bridge["ipMasq"] is False  # nothing leaves the machine, so nothing to masquerade
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.244.0.0/24", "gateway": "10.244.0.1"}]]
    assert bridge["ipam"]["dataDir"] == "/state/node/cni/ipam"
    assert portmap["type"] == "portmap"


def test_the_real_node_looks_like_a_gpu_node_of_its_own_product() -> None:
    labels = node_labels(SPEC)
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-L4"
    assert labels["nvidia.com/gpu.present"] == "true"
    assert labels["nvidia.com/gpu.count"] == "4"
    config = kubelet_configuration(SPEC, PATHS)
    assert config["registerWithTaints"] == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
        # only pods that ask for it: the simulated tier's pods never land here
        {"key": "modeldeploy.io/real-node", "value": "true", "effect": "NoSchedule"},
    ]
    args = kubelet_args(SPEC, PATHS, Path("/bin/kubelet"), Path("/state/kubeconfig"))
    assert "--node-ip=172.30.0.1" in args
    assert "--hostname-override=real-0" in args
    assert any(
        a.startswith("--node-labels=") and "nvidia.com/gpu.product=NVIDIA-L4" in a for a in args
    )


def test_kubelet_listens_on_the_node_address_only_and_never_collects_imported_images() -> None:
    config = kubelet_configuration(SPEC, PATHS)
    assert config["address"] == SPEC.node_ip
    assert config["readOnlyPort"] == 0
    assert config["healthzBindAddress"] == "127.0.0.1"
    assert config["cgroupDriver"] == "cgroupfs"
    assert config["failCgroupV1"] is False
    assert config["containerRuntimeEndpoint"] == f"unix://{PATHS.containerd_socket}"
    assert config["imageGCHighThresholdPercent"] == 100
    assert config["resolvConf"] == "/state/node/resolv.conf"


def test_kube_proxy_binds_locally_and_leaves_conntrack_alone() -> None:
    config = kube_proxy_configuration(SPEC, Path("/state/kubeconfig"))
    assert config["bindAddress"] == SPEC.node_ip
    assert config["healthzBindAddress"].startswith("127.0.0.1:")
    assert config["metricsBindAddress"].startswith("127.0.0.1:")
    assert config["nodePortAddresses"] == ["172.30.0.1/32"]
    assert config["iptables"]["localhostNodePorts"] is False
    assert config["conntrack"]["maxPerCore"] == 0
    assert config["conntrack"]["min"] == 0


def test_guard_drops_every_path_between_the_cluster_and_the_uplinks() -> None:
    rules = nft_guard(SPEC, "modeldeploy", ["eth0", "ens5"])
    for uplink in ("eth0", "ens5"):
        assert f'iifname "{uplink}" drop' in rules  # forwarded in
        assert f'oifname "{uplink}" drop' in rules  # forwarded out
        assert f'oifname "{uplink}" ip daddr {{ {SPEC.pod_cidr}, {SERVICE_CIDR} }} drop' in rules
        assert f'iifname "{uplink}" tcp dport {{ 6443, 10250 }} drop' in rules
    assert "dnat ip to 172.30.0.1:6443" in rules
    assert rules.startswith("table inet modeldeploy_modeldeploy {")


def test_guard_with_no_uplink_still_redirects_the_api_port() -> None:
    rules = nft_guard(SPEC, "md-ci", [])
    assert "drop" not in rules
    assert "table inet modeldeploy_md_ci" in rules
    assert "dnat ip to 172.30.0.1:6443" in rules


def test_control_plane_flags_for_a_real_node() -> None:
    patches = {
        p["name"]: {a["key"]: a["value"] for a in p["extraArgs"]} for p in kwokctl_patches(SPEC)
    }
    assert patches["kube-apiserver"]["bind-address"] == SPEC.node_ip
    assert patches["kube-apiserver"]["advertise-address"] == SPEC.node_ip
    assert patches["kube-apiserver"]["kubelet-preferred-address-types"] == "InternalIP,Hostname"
    assert patches["kwok-controller"]["manage-all-nodes"] == "false"
    assert patches["kwok-controller"]["manage-nodes-with-annotation-selector"] == (
        "kwok.x-k8s.io/node=fake"
    )
    options = kwokctl_options(SPEC)
    assert options["kubeApiserverPort"] == 6443
    assert API_SERVICE_IP in options["kubeApiserverCertSANs"]
    assert SPEC.node_ip in options["kubeApiserverCertSANs"]


def test_uplinks_are_the_default_route_interfaces() -> None:
    routes = [{"dst": "default", "dev": "eth0"}, {"dst": "default", "dev": "eth0"}, {"dst": "x"}]
    assert uplinks_of(routes) == ["eth0"]


def test_mounts_under_prefixes_deepest_first() -> None:
    mountinfo = "\n".join(
        [
            "1 0 0:1 / / rw - ext4 /dev/vda rw",
            "2 1 0:2 / /state/node/kubelet rw - ext4 /dev/vda rw",
            "3 2 0:3 / /state/node/kubelet/pods/x/volumes/kubernetes.io~empty-dir/tmp rw - x x",
            "4 1 0:4 / /run/netns/cni-1234 rw - nsfs nsfs rw",
            "5 1 0:5 / /state/node2 rw - ext4 /dev/vda rw",
        ]
    )
    assert mounts_under(mountinfo, ["/state/node", "/run/netns/cni-"]) == [
        "/state/node/kubelet/pods/x/volumes/kubernetes.io~empty-dir/tmp",
        "/run/netns/cni-1234",
        "/state/node/kubelet",
    ]


PORTALS = "kubernetes service portals"


def test_kube_chains_are_unhooked_then_flushed_then_deleted() -> None:
    rules = "\n".join(
        [
            "-P INPUT ACCEPT",
            "-N KUBE-FIREWALL",
            "-N KUBE-SERVICES",
            "-N DOCKER-USER",
            "-A INPUT -j KUBE-FIREWALL",
            '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
            "-A INPUT -j DOCKER-USER",
            "-A KUBE-FIREWALL -j DROP",
        ]
    )
    assert kube_chain_cleanup(rules) == [
        ["-D", "INPUT", "-j", "KUBE-FIREWALL"],
        ["-D", "OUTPUT", "-m", "comment", "--comment", PORTALS, "-j", "KUBE-SERVICES"],
        ["-F", "KUBE-FIREWALL"],
        ["-F", "KUBE-SERVICES"],
        ["-X", "KUBE-FIREWALL"],
        ["-X", "KUBE-SERVICES"],
    ]
