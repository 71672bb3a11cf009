"""The Helm chart on the real control plane: lint, render, validate, install, run the operator
with the chart's ServiceAccount, check its rights, uninstall."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chart_support import CHART, ROOT, render
from localcluster import Cluster
from localcluster.operator import OperatorProcess
from rollout_support import manual_canary, md_status, start_canary
from support import condition, get, load_example, token_kubeconfig, wait_for

pytestmark = pytest.mark.cluster

EVERYTHING_ON = (
    "monitoring.serviceMonitor=true",
    "monitoring.podMonitor=true",
    "monitoring.prometheusRule=true",
    "grafana.dashboard=true",
    "prometheusAdapter.rules=true",
    "networkPolicy.enabled=true",
)

# What the operator's ServiceAccount may do, cluster-wide: (resource, verbs). Anything more
# fails the test; so does anything less that the operator needs (the install test).
WATCHED_CHILD = {"get", "list", "watch", "create", "patch", "update", "delete"}
ALLOWED = {
    "modeldeployments.serving.modeldeploy.io": {"get", "list", "watch", "patch", "update"},
    "modeldeployments.serving.modeldeploy.io/status": {"get", "patch", "update"},
    "modeldeployments.serving.modeldeploy.io/scale": {"get", "patch", "update"},
    "deployments.apps": {"get", "list", "watch", "create", "patch", "update", "delete"},
    "deployments.apps/scale": {"get", "patch", "update"},
    "services": {"get", "list", "watch", "create", "patch", "update", "delete"},
    "pods": {"get", "list", "watch"},
    "pods/status": {"patch"},  # the serving gate of canary pods after shadow steps
    "configmaps": {"get", "create", "patch"},
    "events": {"create", "patch", "list"},
    "events.events.k8s.io": {"create", "patch"},
    "httproutes.gateway.networking.k8s.io": {
        "get",
        "list",
        "watch",
        "create",
        "patch",
        "update",
        "delete",
    },
    "horizontalpodautoscalers.autoscaling": WATCHED_CHILD,
    "scaledobjects.keda.sh": WATCHED_CHILD,
    # the activator's slice of a scaled-to-zero model's Service; the controller's read
    "endpointslices.discovery.k8s.io": WATCHED_CHILD,
    "nodes": {"get", "list", "watch"},
    "customresourcedefinitions.apiextensions.k8s.io": {"get", "list", "watch"},
}
# What the activator's ServiceAccount may do: read ModelDeployments, raise their scale.
ACTIVATOR_ALLOWED = {
    "modeldeployments.serving.modeldeploy.io": {"get", "list", "watch"},
    "modeldeployments.serving.modeldeploy.io/scale": {"patch"},
}
# Granted to every authenticated identity by Kubernetes itself (system:basic-user and friends).
BUILTIN = {
    "selfsubjectreviews.authentication.k8s.io",
    "selfsubjectaccessreviews.authorization.k8s.io",
    "selfsubjectrulesreviews.authorization.k8s.io",
}


@pytest.fixture(scope="module")
def prometheus_operator_crds(cluster: Cluster) -> None:
    for path in cluster.toolchain.prometheus_operator_crds():
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cluster.wait_established(60)


def test_the_charts_crds_are_byte_identical_to_crds() -> None:
    ours = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert ours == sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    for name in ours:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"charts/modeldeploy/crds/{name} differs from crds/{name}: run `make crds`"
        )


def test_helm_lint_passes_and_the_schema_rejects_unknown_values(cluster: Cluster) -> None:
    cluster.helm("lint", "--strict", str(CHART))
    on = [f"--set={v}" for v in EVERYTHING_ON] + ["--set=networkPolicy.namespaces={models}"]
    cluster.helm("lint", "--strict", str(CHART), *on)
    typo = cluster.helm(
        "lint", "--strict", str(CHART), "--set", "operator.prometheusURL=x", check=False
    )
    assert typo.returncode != 0
    assert "prometheusURL" in typo.stdout + typo.stderr


@pytest.mark.parametrize("optional", [False, True], ids=["defaults", "everything-on"])
def test_the_api_server_accepts_the_rendered_chart_in_a_restricted_namespace(
    cluster: Cluster, namespace: str, prometheus_operator_crds: None, optional: bool
) -> None:
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted"
    )
    values = [*EVERYTHING_ON, f"networkPolicy.namespaces={{{namespace}}}"] if optional else []
    documents = render(*values, namespace=namespace)
    kinds = {doc["kind"] for doc in documents}
    if optional:
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy"} <= kinds
    result = cluster.kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        stdin=yaml.safe_dump_all(documents),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr  # PodSecurity warns, restricted denies


@pytest.fixture
def no_session_operator(operator: OperatorProcess) -> Iterator[None]:
    """Stop the session's (admin) operator while a test runs its own as the chart's account:
    two operators would race, and the admin one would hide missing rights."""
    operator.stop()
    yield
    operator.start()


@pytest.fixture
def installed(cluster: Cluster, crd: None, no_session_operator: None) -> Iterator[str]:
    """The chart installed as release `modeldeploy` into a fresh namespace."""
    release_ns = "modeldeploy-system"
    cluster.kubectl("delete", "namespace", release_ns, "--wait=true", check=False, timeout=120)
    cluster.helm("install", "modeldeploy", str(CHART), "-n", release_ns, "--create-namespace")
    yield release_ns
    cluster.helm("uninstall", "modeldeploy", "-n", release_ns, check=False)
    cluster.kubectl("delete", "namespace", release_ns, "--wait=false", check=False)


def can_i(cluster: Cluster, account: str, verb: str, resource: str, namespace: str) -> str:
    """`kubectl auth can-i` for ``account`` in ``namespace``: "yes" or "no"."""
    answer = cluster.kubectl(
        "auth", "can-i", verb, resource, f"--as={account}", "-n", namespace, check=False
    )
    return answer.stdout.strip()


def rights(cluster: Cluster, account: str) -> dict[str, set[str]]:
    listed = cluster.kubectl("auth", "can-i", "--list", f"--as={account}").stdout
    found: dict[str, set[str]] = {}
    for line in listed.splitlines()[1:]:
        parts = line.split()
        if not parts or parts[0].startswith("["):  # non-resource URLs
            continue
        verbs = line[line.rindex("[") + 1 : line.rindex("]")].split()
        found.setdefault(parts[0], set()).update(verbs)
    return found


def test_install_run_the_operator_with_the_charts_account_and_uninstall(
    cluster: Cluster, installed: str, namespace: str, tmp_path: Path
) -> None:
    account = f"system:serviceaccount:{installed}:modeldeploy"
    granted = {k: v for k, v in rights(cluster, account).items() if k not in BUILTIN}
    assert granted == ALLOWED
    activator = f"system:serviceaccount:{installed}:modeldeploy-activator"
    held = {k: v for k, v in rights(cluster, activator).items() if k not in BUILTIN}
    assert held == ACTIVATOR_ALLOWED
    for forbidden in (
        "get secrets",
        "list secrets",
        "watch secrets",
        "create pods/exec",
        "impersonate users",
        "escalate clusterroles",
        "bind clusterroles",
    ):
        verb, resource = forbidden.split()
        answer = cluster.kubectl(
            "auth", "can-i", verb, resource, f"--as={account}", "-A", check=False
        )
        assert answer.stdout.strip() == "no", forbidden

    # The operator, as the chart's ServiceAccount (a TokenRequest token, not the admin's).
    token = cluster.kubectl(
        "create", "token", "modeldeploy", "-n", installed, "--duration=1h"
    ).stdout.strip()
    # Leader election: the operator's Lease in the release namespace, by name, and no other.
    for verb, resource, where, allowed in (
        ("create", "leases", installed, "yes"),
        ("get", "leases/modeldeploy-operator", installed, "yes"),
        ("update", "leases/modeldeploy-operator", installed, "yes"),
        ("update", "leases/kube-scheduler", installed, "no"),
        ("delete", "leases/modeldeploy-operator", installed, "no"),
        ("create", "leases", "kube-system", "no"),
    ):
        assert can_i(cluster, account, verb, resource, where) == allowed, (verb, resource, where)

    kubeconfig = token_kubeconfig(cluster, token, tmp_path / "operator.kubeconfig")
    operator = OperatorProcess(
        cluster,
        tmp_path / "operator.log",
        kubeconfig=kubeconfig,
        extra_args=(f"--leader-election-namespace={installed}",),  # as in the chart's pod
    )
    operator.start()
    try:
        for example in ("minimal.yaml", "full.yaml"):
            manifest = json.dumps(load_example(example))
            cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest)
        wait_for(
            "resnet50 Ready",
            lambda: ready(cluster, namespace, "resnet50"),
            timeout=60,
        )
        wait_for("bert-large reconciled", lambda: reconciled(cluster, namespace, "bert-large"), 60)
        log = (tmp_path / "operator.log").read_text()
        assert "Forbidden" not in log, log[-2000:]
        assert " 403" not in log, log[-2000:]
        assert f"Acquired Lease {installed}/modeldeploy-operator" in log
    finally:
        operator.stop()

    cluster.helm("uninstall", "modeldeploy", "-n", installed)
    crds = cluster.kubectl("get", "crd", "modeldeployments.serving.modeldeploy.io", check=False)
    assert crds.returncode == 0, "helm uninstall removed the CRD"
    kept = cluster.kubectl("get", "md", "-n", namespace, "-o", "name").stdout.split()
    assert sorted(kept) == [
        "modeldeployment.serving.modeldeploy.io/bert-large",
        "modeldeployment.serving.modeldeploy.io/resnet50",
    ]


def test_a_namespace_scoped_install_runs_the_operator_in_its_namespaces_only(
    cluster: Cluster, crd: None, no_session_operator: None, namespace: str, tmp_path: Path
) -> None:
    """Reliability case 34, second half: with `operator.watchNamespaces` the chart grants
    Roles in those namespaces only, and the operator, run with the chart's own account,
    reconciles there without a single refusal, while it may touch nothing elsewhere."""
    release, release_ns = "scoped", f"scoped-{namespace}"[:63]
    other = f"other-{namespace}"[:63]
    cluster.kubectl("create", "namespace", other)
    cluster.helm("install", release, str(CHART), "-n", release_ns, "--create-namespace",
                 "--set", f"operator.watchNamespaces={{{namespace}}}")  # fmt: skip
    try:
        account = f"system:serviceaccount:{release_ns}:{release}-modeldeploy"
        for verb, resource, where, allowed in (
            ("list", "deployments.apps", namespace, "yes"),
            ("create", "deployments.apps", namespace, "yes"),
            ("watch", "modeldeployments.serving.modeldeploy.io", namespace, "yes"),
            ("list", "deployments.apps", other, "no"),
            ("create", "deployments.apps", other, "no"),
            ("watch", "modeldeployments.serving.modeldeploy.io", other, "no"),
            ("get", "secrets", namespace, "no"),
            ("get", "secrets", other, "no"),
        ):
            assert can_i(cluster, account, verb, resource, where) == allowed, (verb, resource)
        token = cluster.kubectl(
            "create", "token", f"{release}-modeldeploy", "-n", release_ns, "--duration=1h"
        ).stdout.strip()
        operator = OperatorProcess(
            cluster,
            tmp_path / "operator.log",
            kubeconfig=token_kubeconfig(cluster, token, tmp_path / "operator.kubeconfig"),
            extra_args=(f"--namespace={namespace}", f"--leader-election-namespace={release_ns}"),
        )
        operator.start()
        try:
            manifest = json.dumps(load_example("minimal.yaml"))
            for where in (namespace, other):
                cluster.kubectl("apply", "-n", where, "-f", "-", stdin=manifest)
            wait_for("resnet50 Ready", lambda: ready(cluster, namespace, "resnet50"), timeout=60)
            time.sleep(2 * operator.resync_seconds)
            assert get(cluster, other, "deployment", "resnet50-stable") is None
            log = (tmp_path / "operator.log").read_text()
            assert "Forbidden" not in log, log[-2000:]
            assert " 403" not in log, log[-2000:]
        finally:
            operator.stop()
    finally:
        cluster.helm("uninstall", release, "-n", release_ns, check=False)
        for gone in (release_ns, other):
            cluster.kubectl("delete", "namespace", gone, "--wait=false", check=False)


def ready(cluster: Cluster, namespace: str, name: str) -> bool:
    found = condition(get(cluster, namespace, "md", name), "Ready")
    return found is not None and found["status"] == "True"


def reconciled(cluster: Cluster, namespace: str, name: str) -> bool:
    body = get(cluster, namespace, "md", name) or {"metadata": {}}
    generation = body["metadata"].get("generation")
    return generation is not None and body.get("status", {}).get("observedGeneration") == generation


def operator_deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(
        d
        for d in docs
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    )


def operator_cluster_role(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(
        d
        for d in docs
        if d["kind"] == "ClusterRole" and not d["metadata"]["name"].endswith("-activator")
    )


def test_the_chart_renders_the_operator_securely(cluster: Cluster) -> None:
    docs = render("image.digest=sha256:" + "a" * 64, "runtime.digest=sha256:" + "b" * 64)
    deployment = operator_deployment(docs)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith("@sha256:" + "a" * 64)
    # Pinned too: the runtime image the operator puts into every model pod (fetcher, sidecar).
    assert f"--runtime-image=ghcr.io/modeldeploy/runtime@sha256:{'b' * 64}" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role")]
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"], rule
            assert "*" not in rule["resources"], rule
    scoped = render("operator.watchNamespaces={a,b}")
    namespaced = [d for d in scoped if d["kind"] in ("Role", "ClusterRole")]
    assert sorted((d["kind"], d["metadata"].get("namespace", "")) for d in namespaced) == [
        ("ClusterRole", ""),
        ("ClusterRole", ""),  # the activator's: ModelDeployments and their scale
        ("Role", "a"),
        ("Role", "b"),
        ("Role", "modeldeploy-system"),  # the leader-election Lease
        ("Role", "modeldeploy-system"),  # the activator Service's EndpointSlices
    ]
    cluster_rules = operator_cluster_role(namespaced)["rules"]
    assert {r["resources"][0] for r in cluster_rules} == {
        "customresourcedefinitions",
        "nodes",
        "namespaces",  # kopf lists and watches them to serve the ones it is given
    }
    deployment = operator_deployment(scoped)
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["--namespace=a", "--namespace=b"]


def test_the_model_cache_adds_its_flags_and_only_node_patch(cluster: Cluster) -> None:
    """With modelCache.hostPath the operator gets the cache flags and may patch nodes (their
    cache labels); without it, neither."""

    def nodes_verbs(docs: list[dict[str, Any]]) -> list[str]:
        role = operator_cluster_role(docs)
        return next(r["verbs"] for r in role["rules"] if r["resources"] == ["nodes"])

    def operator_args(docs: list[dict[str, Any]]) -> list[str]:
        deployment = operator_deployment(docs)
        args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        return args

    plain = render()
    assert nodes_verbs(plain) == ["get", "list", "watch"]
    assert not [a for a in operator_args(plain) if a.startswith("--model-cache")]
    cached = render("modelCache.hostPath=/var/lib/modeldeploy/models", "modelCache.maxBytes=1000")
    assert nodes_verbs(cached) == ["get", "list", "watch", "patch"]
    assert "--model-cache-dir=/var/lib/modeldeploy/models" in operator_args(cached)
    assert "--model-cache-max-bytes=1000" in operator_args(cached)


def test_the_chart_runs_two_replicas_with_leader_election_by_default(cluster: Cluster) -> None:
    docs = render(namespace="ops")
    deployment = operator_deployment(docs)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    for flag in (
        "--leader-elect",
        "--leader-election-namespace=ops",
        "--leader-election-lease-duration=15",
        "--leader-election-renew-deadline=10",
        "--leader-election-retry-period=2",
        "--reconcile-stall-seconds=300",
        "--workers=4",
        "--reconcile-budget-seconds=30",
    ):
        assert flag in args
    spread = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert spread[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    budget = next(
        d
        for d in docs
        if d["kind"] == "PodDisruptionBudget" and not d["metadata"]["name"].endswith("-activator")
    )
    assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    election = next(
        d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-election")
    )
    assert election["metadata"]["namespace"] == "ops"
    assert election["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["modeldeploy-operator"],
            "verbs": ["get", "update"],
        },
    ]
    # A user's own affinity wins over the default spread.
    custom = render("operator.affinity.example=1")
    pod = operator_deployment(custom)["spec"]["template"]["spec"]
    assert pod["affinity"] == {"example": 1}

    # One replica without election: Recreate, no budget, no Lease rights.
    single = render("replicaCount=1", "leaderElection.enabled=false")
    deployment = operator_deployment(single)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--no-leader-elect" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "affinity" not in deployment["spec"]["template"]["spec"]
    assert not [
        d
        for d in single
        if d["kind"] == "PodDisruptionBudget" and not d["metadata"]["name"].endswith("-activator")
    ]
    assert not [d for d in single if "election" in d["metadata"]["name"]]
    # Two writers without election, or a renew deadline past the lease, are refused.
    for values in (
        ("leaderElection.enabled=false",),
        ("leaderElection.renewDeadlineSeconds=15",),
        ("leaderElection.retryPeriodSeconds=10",),
    ):
        refused = cluster.helm(
            "template", "m", str(CHART), *[f"--set={v}" for v in values], check=False
        )
        assert refused.returncode != 0, values


def previous_release(workdir: Path) -> tuple[str, Path, Path]:
    """The chart at its previous version and the operator code of that commit, from git
    history: (version, chart directory, the `operator/` source root)."""
    chart_yaml = "charts/modeldeploy/Chart.yaml"
    current = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    revisions = git("log", "--format=%H", "--", chart_yaml).split()
    for revision in revisions:
        version = yaml.safe_load(git("show", f"{revision}:{chart_yaml}"))["version"]
        if version != current:
            archive = subprocess.run(
                ["git", "archive", revision, "charts/modeldeploy", "operator"],
                cwd=ROOT,
                capture_output=True,
                check=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive, check=True)
            return version, workdir / "charts" / "modeldeploy", workdir / "operator"
    pytest.fail(f"no chart version before {current} in git history (a shallow clone?)")


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def operator_as(
    cluster: Cluster,
    release_ns: str,
    log: Path,
    kubeconfig: Path,
    *args: str,
    source: Path | None = None,
) -> OperatorProcess:
    token = cluster.kubectl(
        "create", "token", "modeldeploy", "-n", release_ns, "--duration=1h"
    ).stdout.strip()
    process = OperatorProcess(
        cluster,
        log,
        kubeconfig=token_kubeconfig(cluster, token, kubeconfig),
        extra_args=args,
        source=source,
    )
    process.start()
    return process


def test_helm_upgrade_from_the_previous_version_keeps_a_rollout_going(
    cluster: Cluster, crd: None, namespace: str, tmp_path: Path, no_session_operator: None
) -> None:
    release_ns = "modeldeploy-system"
    old_version, old_chart, old_operator = previous_release(tmp_path)
    cluster.kubectl("delete", "namespace", release_ns, "--wait=true", check=False, timeout=120)
    cluster.helm("install", "modeldeploy", str(old_chart), "-n", release_ns, "--create-namespace")
    # The previous release's operator, its own code (that release had no leader election),
    # with the previous chart's rights.
    operator = operator_as(
        cluster, release_ns, tmp_path / "old.log", tmp_path / "old.kubeconfig", source=old_operator
    )
    try:
        # Not today's code: that release had no leader election, so no leader gauge.
        assert "modeldeploy_operator_leader" not in operator.metrics()
        manifest = manual_canary()
        start_canary(cluster, namespace, manifest)
        wait_for(
            "the canary waiting at 50 %",
            lambda: (md_status(cluster, namespace).get("canary") or {}).get("weight") == 50,
            timeout=30,
        )
        before = md_status(cluster, namespace)

        # The documented upgrade: CRDs by server-side apply, then helm upgrade; the old
        # chart's Recreate strategy stops its operator (no election) before the new one starts.
        cluster.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
        cluster.helm("upgrade", "modeldeploy", str(CHART), "-n", release_ns)
        operator.stop()
        operator = operator_as(
            cluster,
            release_ns,
            tmp_path / "new.log",
            tmp_path / "new.kubeconfig",
            f"--leader-election-namespace={release_ns}",
        )
        releases = json.loads(cluster.helm("list", "-n", release_ns, "-o", "json").stdout)
        assert releases[0]["chart"] != f"modeldeploy-{old_version}"
        assert releases[0]["revision"] == "2"

        time.sleep(2 * operator.resync_seconds)  # reconciles under the new chart's rights
        after = md_status(cluster, namespace)
        # The rollout goes on: the same step and weight of the same version, stable still the
        # promoted revision. The canary's revision is new: the revision hash changed between
        # the releases (docs/reliability.md #25), so its analysis starts over.
        assert (after["canary"]["step"], after["canary"]["weight"], after["canary"]["version"]) == (
            before["canary"]["step"],
            before["canary"]["weight"],
            before["canary"]["version"],
        )
        assert after["stable"] == before["stable"]
        cluster.kubectl(
            "annotate",
            "md",
            "resnet50",
            "-n",
            namespace,
            "serving.modeldeploy.io/command=promote",
        )
        wait_for(
            "promotion",
            lambda: md_status(cluster, namespace).get("stable", {}).get("version") == "2",
            timeout=60,
        )
        assert md_status(cluster, namespace)["history"][-1]["result"] == "Promoted"
        log = (tmp_path / "new.log").read_text()
        assert "Forbidden" not in log, log[-2000:]
    finally:
        operator.stop()
        cluster.helm("uninstall", "modeldeploy", "-n", release_ns, check=False)
        cluster.kubectl("delete", "namespace", release_ns, "--wait=false", check=False)
