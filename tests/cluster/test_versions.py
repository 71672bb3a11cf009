"""Every binary reports the pinned release, so version checks (kubectl skew, Helm's
``kubeVersion``) see the real Kubernetes version."""

from __future__ import annotations

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
