"""The pinned toolchain: versions come from go.mod and every binary is stamped with them."""

from __future__ import annotations

from pathlib import Path

import pytest

from localcluster.toolchain import (
    BINARIES,
    Toolchain,
    ToolchainError,
    build_steps,
    default_cache_root,
    fingerprint,
    ldflags,
    minor_of,
    parse_go_mod_requires,
    versions_from_go_mod,
)

GO_MOD = """\
module example.com/tools

go 1.26.0

require (
\thelm.sh/helm/v3 v3.21.4
\tk8s.io/kubernetes v1.36.3 // the control plane
)

require sigs.k8s.io/kwok v0.8.0

require (
\tgo.etcd.io/etcd/server/v3 v3.6.8 // indirect
)

replace k8s.io/api => k8s.io/api v0.36.3
"""


def test_parse_go_mod_reads_block_and_single_line_requires() -> None:
    assert parse_go_mod_requires(GO_MOD) == {
        "helm.sh/helm/v3": "v3.21.4",
        "k8s.io/kubernetes": "v1.36.3",
        "sigs.k8s.io/kwok": "v0.8.0",
        "go.etcd.io/etcd/server/v3": "v3.6.8",
    }


def test_versions_from_go_mod() -> None:
    versions = versions_from_go_mod(GO_MOD)
    assert (versions.kubernetes, versions.kwok, versions.helm, versions.etcd) == (
        "v1.36.3",
        "v0.8.0",
        "v3.21.4",
        "v3.6.8",
    )


def test_go_mod_without_kubernetes_is_a_clear_error() -> None:
    with pytest.raises(ToolchainError, match=r"does not require k8s\.io/kubernetes"):
        versions_from_go_mod(GO_MOD.replace("k8s.io/kubernetes", "k8s.io/other"))


def test_the_real_go_mod_pins_a_recent_kubernetes_and_matching_staging_modules() -> None:
    toolchain = Toolchain.locate({"MODELDEPLOY_CACHE_DIR": "/nonexistent"})
    major, minor = minor_of(toolchain.versions.kubernetes)
    assert (int(major), int(minor)) >= (1, 31)
    patch = toolchain.versions.kubernetes.split(".", 2)[2]
    staging = f"v0.{minor}.{patch}"
    replaces = [
        line.split("=>")[1].split()
        for line in (toolchain.module_dir / "go.mod").read_text().splitlines()
        if "=>" in line and line.strip().startswith("k8s.io/")
    ]
    assert replaces, "go.mod replaces no staging modules"
    assert {version for _, version in replaces} == {staging}


def test_ldflags_stamp_kubernetes_and_helm_versions() -> None:
    flags = ldflags(versions_from_go_mod(GO_MOD))
    assert "-X k8s.io/component-base/version.gitVersion=v1.36.3" in flags
    assert "-X k8s.io/client-go/pkg/version.gitVersion=v1.36.3" in flags
    assert "-X k8s.io/component-base/version.gitMinor=36" in flags
    assert "-X helm.sh/helm/v3/internal/version.version=v3.21.4" in flags
    assert "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=36" in flags


@pytest.mark.parametrize("bad", ["1.36.3", "v1.36", "master"])
def test_minor_of_rejects_non_release_versions(bad: str) -> None:
    with pytest.raises(ToolchainError):
        minor_of(bad)


def test_build_steps_make_every_binary_once() -> None:
    made = [b for step in build_steps(versions_from_go_mod(GO_MOD)) for b in step.binaries]
    assert sorted(made) == sorted(BINARIES)


def test_single_package_steps_name_their_binary(tmp_path: Path) -> None:
    [etcd] = [s for s in build_steps(versions_from_go_mod(GO_MOD)) if s.binaries == ("etcd",)]
    assert etcd.output_args(tmp_path) == ["-o", str(tmp_path / "etcd")]


def test_fingerprint_changes_with_any_input() -> None:
    base = fingerprint(b"mod", b"sum", "-s")
    assert base == fingerprint(b"mod", b"sum", "-s")
    assert (
        len(
            {
                base,
                fingerprint(b"mod2", b"sum", "-s"),
                fingerprint(b"mod", b"sum2", "-s"),
                fingerprint(b"mod", b"sum", "-w"),
                fingerprint(b"mo", b"dsum", "-s"),
            }
        )
        == 5
    )


def test_cache_root_lives_outside_the_repo() -> None:
    assert default_cache_root({"MODELDEPLOY_CACHE_DIR": "/c"}) == Path("/c")
    assert default_cache_root({"XDG_CACHE_HOME": "/x"}) == Path("/x/modeldeploy")
    assert default_cache_root({}) == Path.home() / ".cache" / "modeldeploy"


def test_an_empty_cache_is_not_built(tmp_path: Path) -> None:
    toolchain = Toolchain.locate({"MODELDEPLOY_CACHE_DIR": str(tmp_path)})
    assert toolchain.bin_dir == tmp_path / "bin" / toolchain.versions.kubernetes
    assert not toolchain.is_built()


def test_prometheus_is_built_in_its_own_module_with_only_kubernetes_discovery() -> None:
    steps = build_steps(versions_from_go_mod(GO_MOD), "v0.316.0")
    (prometheus,) = [s for s in steps if s.binaries == ("prometheus",)]
    assert prometheus.module == "prometheus"
    args = prometheus.build_args(Path("/out"), "-s -w")
    assert args[args.index("-tags") + 1] == "remove_all_sd,enable_kubernetes_sd"
    assert args[-1] == "github.com/prometheus/prometheus/cmd/prometheus"
    assert "-o" in args
    assert args[args.index("-o") + 1] == "/out/prometheus"
