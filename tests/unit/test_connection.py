"""The operator hands kopf the same login the kubernetes client loaded, token without scheme."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes.config.incluster_config import InClusterConfigLoader

from modeldeploy_operator.k8s.client import bearer_token, connection_of


def test_in_cluster_token_reaches_kopf_without_its_scheme(tmp_path: Path) -> None:
    """The client's in-cluster loader stores ``bearer <jwt>``; kopf adds ``Bearer`` itself,
    so a scheme left in would send ``Bearer bearer <jwt>`` (401 on every watch)."""
    (tmp_path / "token").write_text("eyJhbGciOi.jwt.sig\n")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    configuration = k8s.Configuration()
    InClusterConfigLoader(  # type: ignore[no-untyped-call]
        token_filename=str(tmp_path / "token"),
        cert_filename=str(tmp_path / "ca.crt"),
        environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
    ).load_and_set(configuration)

    connection = connection_of(k8s.ApiClient(configuration))

    assert connection.token == "eyJhbGciOi.jwt.sig"  # noqa: S105 - a fake token
    assert connection.server == "https://10.96.0.1:443"
    assert connection.ca_path == str(tmp_path / "ca.crt")


@pytest.mark.parametrize(
    ("authorization", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER  abc ", "abc"),
        ("abc", "abc"),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(authorization: str | None, token: str | None) -> None:
    assert bearer_token(authorization) == token
