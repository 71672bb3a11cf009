"""Status decisions from observations: table tests, no cluster."""

from __future__ import annotations

from typing import Any

import pytest

from modeldeploy_operator.api.v1alpha1 import (
    AnalysisResult,
    Condition,
    ModelDeployment,
    ModelDeploymentStatus,
    TrackStatus,
)
from modeldeploy_operator.status import (
    MissingReference,
    Observed,
    canary_condition,
    compute_status,
    recreated_events,
    transition_events,
)
from support import load_example, merged

NOW = "2026-11-21T00:00:00Z"
LATER = "2026-11-21T00:05:00Z"


def md(
    patch: dict[str, Any] | None = None, status: dict[str, Any] | None = None
) -> ModelDeployment:
    doc = merged(load_example("minimal.yaml"), {"metadata": {"namespace": "ns", "generation": 3}})
    doc = merged(doc, patch or {})
    if status is not None:
        doc["status"] = status
    return ModelDeployment.model_validate(doc)


def deployment(
    replicas: int = 1,
    ready: int = 1,
    updated: int = 1,
    available: int = 1,
    current: bool = True,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"generation": 2},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": 2 if current else 1,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "availableReplicas": available,
            "conditions": conditions or [],
        },
    }


def pod(phase: str = "Running", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p-1"}, "status": {"phase": phase, **status}}


UNSCHEDULABLE_GPU = pod(
    "Pending",
    conditions=[
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/4 nodes are available: 2 Insufficient nvidia.com/gpu.",
        }
    ],
)
IMAGE_PULL = pod(
    "Pending",
    containerStatuses=[
        {
            "name": "triton",
            "state": {
                "waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}
            },
        }
    ],
)
FETCH_FAILED = pod(
    "Pending",
    initContainerStatuses=[
        {
            "name": "fetch-model",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 3, "message": "403 Forbidden from s3"}},
        }
    ],
)
TRITON_LOG_TAIL = "\n".join(
    [
        "I1203 09:17:33.602 model_lifecycle.cc:473] loading: iris:1",
        "E1203 09:17:33.602 model_lifecycle.cc:642] \"failed to load 'iris' version 1:"
        ' Internal: SyntaxError: invalid syntax (model.py, line 3)"',
        "| iris  | 1       | UNAVAILABLE: Internal: SyntaxError: invalid syntax |",
        "error: creating server: Internal - failed to load all models",
    ]
)
LOAD_FAILED = pod(
    "Running",
    containerStatuses=[
        {
            "name": "triton",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": TRITON_LOG_TAIL}},
        }
    ],
)
TRITON_KILLED = pod(
    "Running",
    containerStatuses=[
        {
            "name": "triton",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 137, "message": "I1203 serving"}},
        }
    ],
)
FETCHING = pod("Pending", initContainerStatuses=[{"name": "fetch-model", "state": {"running": {}}}])
FETCHING_AGAIN = pod(
    "Pending",
    initContainerStatuses=[
        {
            "name": "fetch-model",
            "state": {"running": {}},
            "lastState": {"terminated": {"exitCode": 3, "message": "403 Forbidden from s3"}},
            "restartCount": 2,
        }
    ],
)
DEADLINE = {
    "type": "Progressing",
    "status": "False",
    "reason": "ProgressDeadlineExceeded",
    "message": "timed out",
}


def test_model_load_failure_names_the_model_and_the_cause() -> None:
    observed = Observed(deployment=deployment(ready=0, available=0), pods=[LOAD_FAILED])
    status = compute_status(md(), observed, "rev", NOW)
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    assert "Triton could not load the model (exit code 1)" in degraded.message
    assert "failed to load 'iris' version 1: Internal: SyntaxError" in degraded.message
    assert "I1203" not in degraded.message  # only the lines that say why
    assert "kubectl logs" not in degraded.message  # the cause is there


def test_a_load_failure_whose_cause_was_cut_off_says_where_the_log_is() -> None:
    tail = "| cache_enabled | 0 |\nerror: creating server: Internal - failed to load all models"
    cut = pod(
        "Running",
        containerStatuses=[
            {
                "name": "triton",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 1, "message": tail}},
            }
        ],
    )
    observed = Observed(deployment=deployment(ready=0, available=0), pods=[cut])
    degraded = next(
        c for c in compute_status(md(), observed, "rev", NOW).conditions if c.type == "Degraded"
    )
    assert degraded.reason == "ModelLoadFailed"
    assert "failed to load all models" in degraded.message
    assert "kubectl logs " in degraded.message
    assert "-c triton --previous" in degraded.message


def test_a_fetcher_retrying_after_a_failure_keeps_the_same_status() -> None:
    """The kubelet restarts a failed fetcher with backoff; while it runs again the status is
    the failure it had, word for word, so a failing update is not rewritten at every retry."""
    statuses = [
        compute_status(
            md(), Observed(deployment=deployment(ready=0, available=0), pods=[p]), "rev", NOW
        )
        for p in (FETCH_FAILED, FETCHING_AGAIN)
    ]
    degraded = [next(c for c in s.conditions if c.type == "Degraded") for s in statuses]
    assert [(c.status, c.reason) for c in degraded] == [("True", "ModelFetchFailed")] * 2
    assert degraded[0].message == degraded[1].message
    assert statuses[0].phase == statuses[1].phase == "Degraded"
    assert conditions(statuses[0]) == conditions(statuses[1])


def conditions(status: ModelDeploymentStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


@pytest.mark.parametrize(
    ("observed", "phase", "ready", "degraded"),
    [
        (Observed(), "Pending", ("False", "ReplicasUnavailable"), ("False", "AsExpected")),
        (
            Observed(deployment=deployment(), pods=[pod()]),
            "Available",
            ("True", "ReplicasAvailable"),
            ("False", "AsExpected"),
        ),
        (
            Observed(deployment=deployment(ready=0, available=0), pods=[FETCHING]),
            "Pending",
            ("False", "FetchingModel"),
            ("False", "AsExpected"),
        ),
        (
            Observed(deployment=deployment(ready=0, available=0), pods=[UNSCHEDULABLE_GPU]),
            "Degraded",
            ("False", "InsufficientGPU"),
            ("True", "InsufficientGPU"),
        ),
        (
            Observed(deployment=deployment(ready=0, available=0), pods=[IMAGE_PULL]),
            "Degraded",
            ("False", "ImagePullBackOff"),
            ("True", "ImagePullBackOff"),
        ),
        (
            Observed(deployment=deployment(ready=0, available=0), pods=[FETCH_FAILED]),
            "Degraded",
            ("False", "ModelFetchFailed"),
            ("True", "ModelFetchFailed"),
        ),
        (
            Observed(deployment=deployment(ready=0, available=0), pods=[LOAD_FAILED]),
            "Degraded",
            ("False", "ModelLoadFailed"),
            ("True", "ModelLoadFailed"),
        ),
        (  # a crash that is not a model load failure stays a crash loop
            Observed(deployment=deployment(ready=0, available=0), pods=[TRITON_KILLED]),
            "Degraded",
            ("False", "CrashLoopBackOff"),
            ("True", "CrashLoopBackOff"),
        ),
        (
            Observed(deployment=deployment(ready=0, available=0, conditions=[DEADLINE])),
            "Degraded",
            ("False", "ProgressDeadlineExceeded"),
            ("True", "ProgressDeadlineExceeded"),
        ),
        (
            Observed(deployment=deployment(), gpu_products=frozenset({"NVIDIA-H100-80GB-HBM3"})),
            "Degraded",
            ("True", "ReplicasAvailable"),
            ("True", "GPUProductNotFound"),
        ),
        (
            Observed(
                deployment=deployment(),
                missing=(MissingReference("Secret", "creds", "spec.model.credentialsSecret"),),
            ),
            "Degraded",
            ("True", "ReplicasAvailable"),
            ("True", "SecretNotFound"),
        ),
        (
            Observed(apply_error="Deployment ns/x was refused: invalid"),
            "Failed",
            ("False", "ApplyFailed"),
            ("True", "ApplyFailed"),
        ),
        # A child refused while the Deployment serves: Degraded, not Failed (and retried).
        (
            Observed(
                deployment=deployment(),
                pods=[pod()],
                apply_error="Service ns/x was refused (500): failed to allocate a serviceIP",
            ),
            "Degraded",
            ("True", "ReplicasAvailable"),
            ("True", "ApplyFailed"),
        ),
        # A rollout that keeps capacity stays Ready while it progresses (kserve#5443).
        (
            Observed(
                deployment=deployment(replicas=2, ready=2, updated=1, available=2),
                pods=[pod(), pod()],
            ),
            "Progressing",
            ("True", "ReplicasAvailable"),
            ("False", "AsExpected"),
        ),
        # ... and a stuck surge pod makes it Degraded, still Ready: old pods serve.
        (
            Observed(
                deployment=deployment(replicas=2, ready=1, updated=1, available=1),
                pods=[pod(), IMAGE_PULL],
            ),
            "Degraded",
            ("True", "ReplicasAvailable"),
            ("True", "ImagePullBackOff"),
        ),
        # The Deployment controller has not seen our latest spec yet.
        (
            Observed(deployment=deployment(current=False), pods=[pod()]),
            "Progressing",
            ("True", "ReplicasAvailable"),
            ("False", "AsExpected"),
        ),
    ],
)
def test_phase_and_conditions(
    observed: Observed, phase: str, ready: tuple[str, str], degraded: tuple[str, str]
) -> None:
    status = compute_status(md(), observed, "rev", NOW)
    assert status.phase == phase
    assert conditions(status)["Ready"] == ready
    assert conditions(status)["Degraded"] == degraded
    assert status.observed_generation == 3
    assert all(c.observed_generation == 3 for c in status.conditions)


def test_counts_selector_and_gpus() -> None:
    status = compute_status(
        md({"spec": {"replicas": 3}}), Observed(deployment=deployment(3, 2, 3, 2)), "rev", NOW
    )
    assert (status.replicas, status.ready_replicas, status.updated_replicas) == (3, 2, 3)
    assert status.ready == "2/3"
    assert status.gpus == 3
    assert status.selector == "serving.modeldeploy.io/modeldeployment=resnet50"
    assert status.stable is not None
    assert (status.stable.version, status.stable.revision) == ("1", "rev")


def test_autoscaled_desired_count_is_the_autoscalers_choice_within_bounds() -> None:
    scaling = {
        "minReplicas": 1,
        "maxReplicas": 5,
        "metrics": [{"type": "InFlightPerReplica", "target": 4}],
    }
    scaled = md({"spec": {"replicas": 4, "autoscaling": scaling}})
    status = compute_status(scaled, Observed(deployment=deployment(4, 4, 4, 4)), "rev", NOW)
    assert status.ready == "4/4"
    assert status.phase == "Available"
    capped = compute_status(
        scaled,
        Observed(deployment=deployment(4, 4, 4, 4), at_gpu_capacity="the GPUs hold 4"),
        "rev",
        NOW,
    )
    condition = next(c for c in capped.conditions if c.type == "AtGPUCapacity")
    assert (condition.status, condition.message) == ("True", "the GPUs hold 4")
    assert [e.reason for e in transition_events(status, capped)] == ["AtGPUCapacity"]
    fixed = compute_status(md(), Observed(deployment=deployment()), "rev", NOW)
    assert "AtGPUCapacity" not in {c.type for c in fixed.conditions}


def test_unchanged_conditions_keep_their_transition_time_and_changed_ones_move() -> None:
    first = compute_status(md(), Observed(deployment=deployment(), pods=[pod()]), "rev", NOW)
    again = compute_status(
        md(status=first.model_dump(by_alias=True, mode="json")),
        Observed(deployment=deployment(), pods=[pod()]),
        "rev",
        LATER,
    )
    assert again == first  # nothing changed: no write
    broken = compute_status(
        md(status=first.model_dump(by_alias=True, mode="json")),
        Observed(deployment=deployment(ready=0, available=0), pods=[IMAGE_PULL]),
        "rev",
        LATER,
    )
    times = {c.type: c.last_transition_time for c in broken.conditions}
    assert times["Ready"] == LATER
    assert times["Degraded"] == LATER


def test_events_only_on_transitions() -> None:
    empty = ModelDeploymentStatus()
    ready = compute_status(md(), Observed(deployment=deployment(), pods=[pod()]), "rev", NOW)
    assert [(e.type, e.reason) for e in transition_events(empty, ready)] == [
        ("Normal", "Ready"),
        ("Normal", "RolloutComplete"),
    ]
    assert transition_events(ready, ready) == []
    broken = compute_status(
        md(status=ready.model_dump(by_alias=True, mode="json")),
        Observed(deployment=deployment(ready=0, available=0), pods=[UNSCHEDULABLE_GPU]),
        "rev",
        LATER,
    )
    assert [(e.type, e.reason) for e in transition_events(ready, broken)] == [
        ("Warning", "NotReady"),
        ("Warning", "InsufficientGPU"),
    ]
    healed = compute_status(
        md(status=broken.model_dump(by_alias=True, mode="json")),
        Observed(deployment=deployment(), pods=[pod()]),
        "rev",
        LATER,
    )
    reasons = [(e.type, e.reason) for e in transition_events(broken, healed)]
    assert ("Normal", "Recovered") in reasons
    assert ("Normal", "Ready") in reasons


def test_a_child_found_deleted_once_its_generation_was_reconciled_is_an_event() -> None:
    hpa = {"kind": "HorizontalPodAutoscaler", "metadata": {"name": "resnet50"}}
    stable = {"kind": "Deployment", "metadata": {"name": "resnet50-stable"}}
    config = {"kind": "ConfigMap", "metadata": {"name": "resnet50-budget"}}
    settled = md(status={"observedGeneration": 3})
    seen = {"HorizontalPodAutoscaler/resnet50": None, "Deployment/resnet50-stable": stable}
    events = recreated_events(settled, seen, [hpa, stable, config], failing=False)
    assert [(e.type, e.reason, e.message) for e in events] == [
        ("Warning", "Recreated", "HorizontalPodAutoscaler resnet50 was deleted; created it again")
    ]
    # A new spec's new child is no news; nor is one whose last apply failed; nor one the
    # snapshot does not vouch for (a kind read from the API server: the ConfigMap).
    assert recreated_events(md(status={"observedGeneration": 2}), seen, [hpa], False) == []
    assert recreated_events(md(), seen, [hpa], False) == []
    assert recreated_events(settled, seen, [hpa], failing=True) == []
    assert recreated_events(settled, seen, [config], failing=False) == []


def test_canary_healthy_says_what_the_last_analysis_said() -> None:
    ready = TrackStatus(version="2", ready_since=1.0)
    passed = AnalysisResult(name="errors", result="Passed")
    failed = AnalysisResult(name="p99", result="Failed")
    unknown = AnalysisResult(name="drift", result="Inconclusive")

    def verdict(canary: TrackStatus | None, *results: AnalysisResult, analysed: bool = True) -> Any:
        found = canary_condition(canary, results, analysed)
        return found and found[1:3]

    assert verdict(None) is None  # no canary, no condition
    assert verdict(TrackStatus(version="2")) == ("Unknown", "CanaryNotReady")
    assert verdict(ready, analysed=False) == ("True", "CanaryReady")
    assert verdict(ready) == ("Unknown", "AwaitingAnalysis")
    assert verdict(ready, passed) == ("True", "AnalysisPassed")
    assert verdict(ready, passed, unknown) == ("Unknown", "AnalysisInconclusive")
    assert verdict(ready, passed, unknown, failed) == ("False", "AnalysisFailed")


def test_messages_say_what_is_wrong() -> None:
    status = compute_status(
        md(), Observed(deployment=deployment(ready=0, available=0), pods=[FETCH_FAILED]), "rev", NOW
    )
    degraded = next(c for c in status.conditions if c.type == "Degraded")
    assert "exit code 3" in degraded.message
    assert "403 Forbidden from s3" in degraded.message
    assert isinstance(degraded, Condition)


def test_warm_replicas_count_the_pods_whose_fetcher_found_the_model_in_the_node_cache() -> None:
    def fetched(report: str, code: int = 0) -> dict[str, Any]:
        done = {"terminated": {"exitCode": code, "message": report}}
        return pod(initContainerStatuses=[{"name": "fetch-model", "state": done}])

    warm = fetched('{"digest":"sha256:1","warm":true}')
    cold = fetched('{"digest":"sha256:1","warm":false}')
    older = fetched("")  # a runtime that wrote no report
    failed = fetched('{"warm":true}', code=1)
    archive = md({"spec": {"model": {"storageUri": "oci://r.io/resnet:1"}}})
    observed = Observed(deployment=deployment(4, 4, 4, 4), pods=[warm, cold, older, failed])
    assert compute_status(archive, observed, "rev", NOW).warm_replicas == 1
    assert compute_status(md(), observed, "rev", NOW).warm_replicas is None  # no cache there
