"""Faults at the boundary with the API server, made by real components: a TCP relay between
the operator and the real kube-apiserver that silences or cuts its connections
(``localcluster.faultproxy``), the kube-apiserver itself frozen (SIGSTOP) and restarted, and
etcd compacted. The operator is a real process; nothing answers in the API server's place.

The operators here watch only the test's namespace, with short watches (the server ends each
after 8-16 s, so each watch hears from it at least that often) and an inactivity timeout of
25 s, so that a stall is noticed in well under a minute; the defaults are 300-600 s and 70 s.
"""

from __future__ import annotations

import datetime
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from localcluster import Cluster
from localcluster.faultproxy import FaultProxy, upstream_of
from localcluster.operator import OperatorProcess, metric_sum
from rollout_support import StatusRecorder, manual_canary, md_status, start_canary
from support import cpu_model, get, start_scoped_operator, token_kubeconfig, wait_for

pytestmark = pytest.mark.cluster

WATCH_TIMEOUT = 8  # --watch-timeout: every watch hears from the server within 16 s
INACTIVITY = 25.0  # --watch-inactivity-timeout
# The child watches every operator has (ScaledObjects and HTTPRoutes too when their CRDs are
# installed, as they may be in a session).
CHILD_WATCHES = ("Deployment", "Service", "Pod", "HorizontalPodAutoscaler")
THROTTLED_MODELS = 20
LOAD_THREADS = 12
REFUSALS = 3


def replicas(cluster: Cluster, namespace: str, deployment: str) -> int | None:
    found = get(cluster, namespace, "deployment", deployment)
    return None if found is None else int(found["spec"]["replicas"])


def scale(cluster: Cluster, namespace: str, name: str, count: int) -> None:
    patch = json.dumps({"spec": {"replicas": count}})
    cluster.kubectl("patch", "md", name, "-n", namespace, "--type=merge", "-p", patch)


@pytest.fixture
def proxy(cluster: Cluster) -> Iterator[FaultProxy]:
    relay = FaultProxy(upstream_of(cluster.state.kubeconfig)).start()
    try:
        yield relay
    finally:
        relay.close()


def start_operator(
    started: list[OperatorProcess],
    cluster: Cluster,
    namespace: str,
    log: Path,
    *args: str,
    kubeconfig: Path | None = None,
) -> OperatorProcess:
    """A scoped operator with short watches (see the module's docstring)."""
    timeouts = (f"--watch-timeout={WATCH_TIMEOUT}", f"--watch-inactivity-timeout={INACTIVITY:g}")
    return start_scoped_operator(
        started, cluster, namespace, log, *timeouts, *args, kubeconfig=kubeconfig
    )


def found_in_audit_log(
    cluster: Cluster, namespace: str, identity: str, model: str
) -> tuple[datetime.datetime, datetime.datetime]:
    """When kopf's first list of ModelDeployments after ``model`` was created was answered
    (the list that found it), and when the operator named ``identity`` first wrote its
    Deployment: from the API server's audit log."""

    def at(event: dict[str, Any], key: str) -> datetime.datetime:
        return datetime.datetime.fromisoformat(event[key].replace("Z", "+00:00"))

    events = cluster.audit_events()
    (since,) = [
        at(e, "stageTimestamp")
        for e in events
        if e["verb"] == "create"
        and e["objectRef"].get("resource") == "modeldeployments"
        and e["objectRef"].get("namespace") == namespace
        and e["objectRef"].get("name") == model
        and e.get("responseStatus", {}).get("code") == 201
    ]
    lists = [
        at(e, "stageTimestamp")
        for e in events
        if e["verb"] == "list"
        and e["stage"] == "ResponseComplete"
        and e.get("responseStatus", {}).get("code") == 200
        and e["userAgent"].startswith("kopf/")
        and e["objectRef"].get("resource") == "modeldeployments"
        and e["objectRef"].get("namespace") == namespace
        and at(e, "requestReceivedTimestamp") > since
    ]
    writes = [
        at(e, "requestReceivedTimestamp")
        for e in events
        if e["verb"] in ("create", "patch", "update")
        and f"({identity})" in e["userAgent"]
        and e["objectRef"].get("resource") == "deployments"
        and e["objectRef"].get("name") == f"{model}-stable"
    ]
    assert lists, "no list of ModelDeployments by kopf after the gap in the audit log"
    assert writes, f"no write of {model}-stable in the audit log"
    return min(lists), min(writes)


def failing_health(process: OperatorProcess) -> str | None:
    """``/healthz``'s complaint while it fails with 500, else None."""
    code, text = process.health()
    return text if code == 500 else None


def serving_through(
    cluster: Cluster, proxy: FaultProxy, namespace: str, tmp_path: Path, started: list[Any]
) -> OperatorProcess:
    """An operator without election that talks through ``proxy`` (added to ``started``, for
    the fixture to stop), and resnet50 rolled out."""
    kubeconfig = proxy.kubeconfig(cluster.state.kubeconfig, tmp_path / "through-proxy")
    process = start_operator(
        started, cluster, namespace, tmp_path / "operator.log", "--no-leader-elect",
        kubeconfig=kubeconfig,
    )  # fmt: skip
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(cpu_model("resnet50")))
    wait_for("the Deployment", lambda: replicas(cluster, namespace, "resnet50-stable") == 1)
    return process


def watch_metric(process: OperatorProcess, name: str, namespace: str, **labels: str) -> float:
    return sum(
        metric_sum(process.metrics(), name, watch=f"{kind} in {namespace}", **labels)
        for kind in CHILD_WATCHES
    )


def test_silent_watches_are_dropped_within_the_inactivity_timeout_and_nothing_is_missed(
    cluster: Cluster,
    own_operator: list[OperatorProcess],
    proxy: FaultProxy,
    namespace: str,
    tmp_path: Path,
) -> None:
    """Every open connection between the operator and the API server goes silent (new ones
    still pass): a change made then is invisible until the watches notice the silence; they
    resume from where they were (no list again), and the change is applied."""
    process = serving_through(cluster, proxy, namespace, tmp_path, own_operator)
    assert proxy.accepted > 0  # the operator talks through the relay

    proxy.stall()
    stalled = time.monotonic()
    scale(cluster, namespace, "resnet50", 2)
    time.sleep(3)  # unharmed, the change is applied within a second
    assert replicas(cluster, namespace, "resnet50-stable") == 1, "the stall did not bite"
    wait_for(
        "the change, once the silent watches are dropped",
        lambda: replicas(cluster, namespace, "resnet50-stable") == 2,
        timeout=INACTIVITY + 20,
    )
    noticed = time.monotonic() - stalled
    assert noticed <= INACTIVITY + 20
    wait_for(
        "a stall counted on every child watch",
        lambda: all(
            metric_sum(
                process.metrics(),
                "modeldeploy_operator_watch_stalls_total",
                watch=f"{kind} in {namespace}",
            )
            >= 1
            for kind in CHILD_WATCHES
        ),
        timeout=INACTIVITY + 10,
    )
    # Resumed from the last resourceVersion seen: nothing was listed again.
    assert watch_metric(process, "modeldeploy_operator_watch_relists_total", namespace) == 0
    assert process.running
    assert process.health() == (200, "ok")
    assert (
        f"heard nothing for {INACTIVITY:g} s; watching again from resourceVersion"
        in (tmp_path / "operator.log").read_text()
    )


def test_a_partitioned_operator_fails_its_health_check_and_recovers_when_healed(
    cluster: Cluster,
    own_operator: list[OperatorProcess],
    proxy: FaultProxy,
    namespace: str,
    tmp_path: Path,
) -> None:
    """Nothing gets through, new connections included: /healthz says which watch has heard
    nothing for how long, and the silence shows in the metrics; once healed the operator
    lists again, applies what changed meanwhile, and is healthy. (Without leader election:
    with it, the leader would step down at its renew deadline, see the partition test in
    test_high_availability.py.)"""
    process = serving_through(cluster, proxy, namespace, tmp_path, own_operator)

    proxy.partition()
    scale(cluster, namespace, "resnet50", 2)
    problem = wait_for("/healthz to fail", lambda: failing_health(process), timeout=INACTIVITY + 20)
    assert "watch has heard nothing from the API server for" in problem, problem
    silence = max(  # of every watch: /healthz fails for the first one past the timeout
        value
        for series, value in process.metrics().items()
        if series.startswith("modeldeploy_operator_watch_silence_seconds{")
        and f" in {namespace}" in series
    )
    assert silence > INACTIVITY
    assert replicas(cluster, namespace, "resnet50-stable") == 1

    proxy.heal()
    wait_for(
        "the change applied after the partition",
        lambda: replicas(cluster, namespace, "resnet50-stable") == 2,
        timeout=60,  # the watches' backoff grows to 30 s while nothing answers
    )
    wait_for("/healthz to pass again", lambda: process.health() == (200, "ok"), timeout=30)
    assert process.running


def test_an_api_server_frozen_then_restarted_mid_rollout_loses_nothing(
    cluster: Cluster,
    own_operator: list[OperatorProcess],
    proxy: FaultProxy,
    namespace: str,
    tmp_path: Path,
) -> None:
    """Mid-canary, the kube-apiserver is frozen (SIGSTOP) past the watches' inactivity
    timeout, then thawed. Then the operator's watches fall behind (their connections go
    silent), a ModelDeployment is created, etcd is compacted and the kube-apiserver killed
    and started again: the watches notice the silence, come back with versions that are
    gone (410 Gone), list again and miss nothing. The canary stays at its step throughout,
    and then completes. Leader election stays on, with a renew deadline longer than the
    outages (the defaults would have the leader step down and exit after 10 s, and another
    process take over: test_high_availability.py)."""
    kubeconfig = proxy.kubeconfig(cluster.state.kubeconfig, tmp_path / "through-proxy")
    process = start_operator(
        own_operator,
        cluster,
        namespace,
        tmp_path / "operator.log",
        "--leader-election-lease-duration=120",
        "--leader-election-renew-deadline=90",
        "--leader-election-retry-period=2",
        kubeconfig=kubeconfig,
    )
    start_canary(cluster, namespace, manual_canary())
    wait_for(
        "the canary at its manual step",
        lambda: (
            (md_status(cluster, namespace).get("canary") or {}).get("step") == 0
            and replicas(cluster, namespace, "resnet50-canary") == 1
        ),
        timeout=60,
    )
    before = md_status(cluster, namespace)["canary"]

    # 1. The API server stops dead: connections stay open, nothing answers.
    cluster.signal_component("kube-apiserver", signal.SIGSTOP)
    try:
        problem = wait_for(
            "/healthz to report the silence",
            lambda: failing_health(process),
            timeout=INACTIVITY + 20,
        )
    finally:
        cluster.signal_component("kube-apiserver", signal.SIGCONT)
    assert "heard nothing from the API server" in problem, problem
    wait_for("/healthz to pass again", lambda: process.health() == (200, "ok"), timeout=60)

    # 2. Watches behind, a change they cannot see, versions gone, an API server restarted.
    proxy.stall()
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(cpu_model("late")))
    cluster.compact_etcd()
    cluster.restart_component("kube-apiserver")
    wait_for(
        "the watches to list again after 410 Gone",
        lambda: (
            watch_metric(
                process, "modeldeploy_operator_watch_relists_total", namespace, reason="expired"
            )
            >= 1
        ),
        timeout=INACTIVITY + 30,
    )
    wait_for(
        "the ModelDeployment created in the gap",
        lambda: replicas(cluster, namespace, "late-stable") == 1,
        timeout=60,
    )
    assert process.running
    # Reconciled within 5 s of the list that found it (the API server's audit log has both).
    # Its first write may go out on a keep-alive connection the stall silenced, if kopf's
    # watch noticed the silence before any of the operator's own did (a silent watch or a
    # timed-out request closes the idle ones: KubernetesApi.forget_connections): that write
    # times out after --api-timeout (10 s), counted, and the next goes out at once.
    identity = process.identity()
    assert identity is not None
    listed, created = found_in_audit_log(cluster, namespace, identity, "late")
    timed_out = metric_sum(
        process.metrics(),
        "modeldeploy_api_requests_total",
        verb="APPLY|PATCH|POST|PUT",
        kind="Deployment",
        code="0",
    )
    assert timed_out <= 1
    allowed = datetime.timedelta(seconds=5 + 10 * timed_out)
    assert created - listed <= allowed, (listed, created, timed_out)

    # The rollout never moved: same step, same start, one canary Deployment.
    after = md_status(cluster, namespace)["canary"]
    assert (after["step"], after["stepStarted"], after["started"]) == (
        before["step"],
        before["stepStarted"],
        before["started"],
    )
    deployments = cluster.kubectl_json("get", "deployments", "-n", namespace)["items"]
    assert sorted(d["metadata"]["name"] for d in deployments) == [
        "late-stable",
        "resnet50-canary",
        "resnet50-stable",
    ]
    cluster.kubectl(
        "annotate", "md", "resnet50", "-n", namespace, "serving.modeldeploy.io/command=resume"
    )
    wait_for(
        "promotion",
        lambda: md_status(cluster, namespace).get("stable", {}).get("version") == "2",
        timeout=60,
    )
    assert [h["result"] for h in md_status(cluster, namespace)["history"]] == ["Promoted"]


@pytest.fixture
def throttled_account(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Path]:
    """A ServiceAccount whose every request API Priority and Fairness sends to a priority
    level of its own: the smallest concurrency share (about 3 seats of the server's 600), no
    borrowing, no queue. Beyond it the real API server answers 429 with Retry-After. (It may
    do anything, cluster-admin: what it may do is not the point here.) Yields a kubeconfig."""
    name = f"throttled-{namespace}"[:63]
    subject = {
        "kind": "ServiceAccount",
        "serviceAccount": {"name": "throttled", "namespace": namespace},
    }
    objects = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "throttled", "namespace": namespace},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "throttled", "namespace": namespace}],
        },
        {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "PriorityLevelConfiguration",
            "metadata": {"name": name},
            "spec": {
                "type": "Limited",
                "limited": {
                    "nominalConcurrencyShares": 1,
                    "lendablePercent": 0,
                    "borrowingLimitPercent": 0,
                    "limitResponse": {"type": "Reject"},
                },
            },
        },
        {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "FlowSchema",
            "metadata": {"name": name},
            "spec": {
                "priorityLevelConfiguration": {"name": name},
                "matchingPrecedence": 300,  # before the defaults' service-accounts (9000)
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [
                    {
                        "subjects": [subject],
                        "resourceRules": [
                            {
                                "verbs": ["*"],
                                "apiGroups": ["*"],
                                "resources": ["*"],
                                "namespaces": ["*"],
                                "clusterScope": True,
                            }
                        ],
                        "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                    }
                ],
            },
        },
    ]
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    cluster.kubectl("apply", "-f", "-", stdin=manifest)
    try:
        token = cluster.kubectl(
            "create", "token", "throttled", "-n", namespace, "--duration=1h"
        ).stdout.strip()
        yield token_kubeconfig(cluster, token, tmp_path / "throttled.kubeconfig")
    finally:
        for kind in ("flowschema", "prioritylevelconfiguration", "clusterrolebinding"):
            cluster.kubectl("delete", kind, name, "--wait=false", check=False)


class Load:
    """Threads that list namespaces as the throttled account, as fast as they are let: its
    priority level is full while they run. Counts what the API server answered."""

    def __init__(self, kubeconfig: Path, threads: int) -> None:
        configuration = k8s.Configuration()
        k8s_config.load_kube_config(str(kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
        configuration.retries = False  # every answer counted, a 429 too (urllib3 would wait)
        self.client = k8s.ApiClient(configuration)
        self.answers: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        api = k8s.CoreV1Api(self.client)
        while not self._stop.is_set():
            try:  # longer than APF's queue wait (15 s), so a queued request ends in a 429
                api.list_namespace(_request_timeout=30)
                code = 200
            except k8s.ApiException as error:
                code = int(error.status or 0)
            except Exception:  # a timeout or a reset must not end the thread
                code = 0
            with self._lock:
                self.answers[code] = self.answers.get(code, 0) + 1


def test_throttled_by_priority_and_fairness_the_operator_waits_and_converges(
    cluster: Cluster,
    own_operator: list[OperatorProcess],
    throttled_account: Path,
    namespace: str,
    tmp_path: Path,
) -> None:
    """The operator runs as an account that the real API server throttles (API Priority and
    Fairness), while other clients of the same account fill its share: the operator gets
    429s with Retry-After, waits them out, and once the share frees every ModelDeployment
    converges. (While the share stays full, a client of the same identity starves the
    operator: give it a priority level of its own, docs/reliability.md.)"""
    process = start_operator(
        own_operator,
        cluster,
        namespace,
        tmp_path / "operator.log",
        "--no-leader-elect",
        kubeconfig=throttled_account,
    )
    models = [cpu_model(f"m{i:02d}") for i in range(THROTTLED_MODELS)]

    def available() -> int:
        listed = cluster.kubectl_json("get", "md", "-n", namespace)["items"]
        return sum(1 for m in listed if m.get("status", {}).get("phase") == "Available")

    with Load(throttled_account, LOAD_THREADS) as load:
        cluster.kubectl(
            "apply",
            "-n",
            namespace,
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": models}),
        )
        wait_for(
            "the operator refused",
            lambda: (
                metric_sum(process.metrics(), "modeldeploy_api_requests_total", code="429")
                >= REFUSALS
            ),
            timeout=60,
        )
        # the priority level was full: the load's own requests were queued, then refused
        wait_for("the load refused", lambda: load.answers.get(429, 0) > 0, timeout=60)
    # The share free again (the load stopped), everything converges: nothing was given up.
    wait_for(f"{THROTTLED_MODELS} Available", lambda: available() == THROTTLED_MODELS, timeout=120)
    throttled = metric_sum(process.metrics(), "modeldeploy_api_requests_total", code="429")
    print(f"load answers {load.answers}; the operator was refused {throttled:.0f} times")
    assert process.running


LAG = 15.0  # under the inactivity timeout (25 s): kopf's watch is behind, not silent


def test_a_lagging_watch_never_takes_the_operator_back_to_an_older_generation(
    cluster: Cluster,
    own_operator: list[OperatorProcess],
    proxy: FaultProxy,
    namespace: str,
    tmp_path: Path,
) -> None:
    """Case #4. kopf's connection (the ModelDeployment watch) goes through the relay, the
    operator's own client does not. The relay starts to hold what the API server sends for
    15 s; meanwhile another client makes two changes (generations 2 and 3) and deletes the
    model's Deployment, so the operator has a status to write while its watch still shows
    generation 1: that write is refused (409, it is preconditioned on the version it decided
    from), and the operator reads the object again and carries out generation 3, the
    Deployment recreated with generation 3's replicas, never generation 1's. Then the watch
    delivers generations 2 and 3, late. Every version of the ModelDeployment and of its
    Deployment is recorded from a watch of our own: the status's observedGeneration never
    goes down, and once the Deployment has generation 3's replicas it never has another count
    until generation 4, which (nothing else revealing it) waits for the late watch."""
    process = start_operator(
        own_operator, cluster, namespace, tmp_path / "operator.log",
        f"--watch-server=https://{proxy.address}",
    )  # fmt: skip
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(cpu_model("resnet50")))
    wait_for(
        "generation 1 observed",
        lambda: (
            md_status(cluster, namespace).get("observedGeneration") == 1
            and md_status(cluster, namespace).get("readyReplicas") == 1
        ),
    )
    statuses = StatusRecorder(cluster, namespace)
    deployments = StatusRecorder(cluster, namespace, ("apps/v1", "Deployment"), "resnet50-stable")
    try:
        proxy.lag(LAG)
        lagging = time.monotonic()
        scale(cluster, namespace, "resnet50", 2)
        scale(cluster, namespace, "resnet50", 3)
        first = get(cluster, namespace, "deployment", "resnet50-stable")
        assert first is not None
        cluster.kubectl("delete", "deployment", "-n", namespace, "resnet50-stable")
        wait_for(
            "generation 3 carried out",
            lambda: (
                replicas(cluster, namespace, "resnet50-stable") == 3
                and md_status(cluster, namespace).get("observedGeneration") == 3
            ),
            timeout=LAG + 30,
        )
        early = time.monotonic() - lagging
        print(f"generation 3 carried out {early:.1f} s after the lag began")
        assert early < LAG - 2, "carried out only when the late watch brought it"
        # The late events arrive and are handled. Then quiet for longer than the lag: the
        # operator's own writes have come back through the watch (until they do, a pass
        # reads the object from the API server, which would reveal the next change).
        wait_for(
            "the status quiet for longer than the lag",
            lambda: (
                time.monotonic() - lagging > LAG
                and md_status(cluster, namespace).get("readyReplicas") == 3
                and time.monotonic() - statuses.seen[-1][0] > LAG + 3
            ),
            timeout=LAG * 3 + 30,
        )
        # The watch really is behind: a change with nothing else to reveal it waits for it.
        changed = time.monotonic()
        scale(cluster, namespace, "resnet50", 4)
        time.sleep(LAG / 2)
        assert replicas(cluster, namespace, "resnet50-stable") == 3
        wait_for(
            "generation 4, once the watch brings it",
            lambda: replicas(cluster, namespace, "resnet50-stable") == 4,
            timeout=LAG + 20,
        )
        late = time.monotonic() - changed
        print(f"generation 4 carried out {late:.1f} s after the change")
        assert late >= LAG - 1
    finally:
        statuses.stop()
        deployments.stop()
    assert process.running
    # Generation 3 came early because a status write from generation 1's view was refused.
    assert metric_sum(process.metrics(), "modeldeploy_api_requests_total", code="409") >= 1
    observed = [s.get("observedGeneration", 0) for _, _, s in statuses.seen]
    assert observed == sorted(observed), f"observedGeneration went down: {observed}"
    recreated = [
        int(d["spec"]["replicas"])
        for d in deployments.objects
        if d["metadata"]["uid"] != first["metadata"]["uid"]
    ]
    assert recreated[0] == 3, f"recreated from an older generation: {recreated}"
    counts = [int(d["spec"]["replicas"]) for d in deployments.objects]
    after = counts[counts.index(3) : counts.index(4)]
    assert after == [3] * len(after), f"the Deployment's replicas after 3: {counts}"
    assert counts[counts.index(4) :] == [4] * len(counts[counts.index(4) :]), counts
