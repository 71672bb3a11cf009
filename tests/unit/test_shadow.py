"""Shadow traffic in the sidecar: comparing two answers, reading the operator's config, and the
mirror's bounded queue (a fake canary connection; tests/triton mirrors to a real one)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modeldeploy_runtime.drift import Array
from modeldeploy_runtime.http1 import Request
from modeldeploy_runtime.shadow import (
    Copy,
    Mirror,
    MirrorFailure,
    ShadowConfig,
    ShadowFile,
    ShadowMetrics,
    compare,
    output_psi,
)

PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])


def test_identical_answers_agree_with_no_error() -> None:
    (diff,) = compare({"p": PROBS}, {"p": PROBS.copy()}, {"p": "FP32"})
    assert (diff.rows, diff.disagreements, diff.absolute_error, diff.relative_error) == (3, 0, 0, 0)
    assert diff.top_k_overlap == 3.0  # every row shares its top-2 classes


def test_swapped_classes_disagree_on_every_row_they_change() -> None:
    swapped = PROBS[:, [0, 2, 1]]  # classes 1 and 2 swapped
    (diff,) = compare({"p": PROBS}, {"p": swapped}, {"p": "FP32"})
    # Row 0's top-1 (class 0) is unchanged; rows 1 and 2 change theirs.
    assert diff.disagreements == 2
    assert diff.relative_error > 0


def test_a_20_percent_shift_is_a_relative_error_of_0_2_without_disagreement() -> None:
    (diff,) = compare({"score": PROBS}, {"score": PROBS * 1.2}, {"score": "FP32"})
    assert diff.relative_error / diff.rows == pytest.approx(0.2)
    assert diff.disagreements == 0  # the same top-1 class


def test_numeric_outputs_have_errors_but_no_disagreement() -> None:
    stable = np.array([[1.0], [2.0]])
    (diff,) = compare({"y": stable}, {"y": stable + 0.5}, {"y": "FP32"})
    assert diff.disagreements is None
    assert diff.top_k_overlap is None
    assert diff.absolute_error / diff.rows == pytest.approx(0.5)


def test_integer_labels_disagree_when_they_differ() -> None:
    stable = np.array([[1.0], [2.0], [0.0]])
    (diff,) = compare(
        {"label": stable}, {"label": np.array([[1.0], [0.0], [0.0]])}, {"label": "INT64"}
    )
    assert diff.disagreements == 1


def test_a_missing_or_reshaped_output_is_a_mismatch_on_every_row() -> None:
    (missing,) = compare({"p": PROBS}, {}, {"p": "FP32"})
    (reshaped,) = compare({"p": PROBS}, {"p": PROBS[:, :2]}, {"p": "FP32"})
    for diff in (missing, reshaped):
        assert diff.mismatched
        assert diff.disagreements == 3
        assert diff.relative_error == 3
        assert math.isnan(diff.absolute_error)


def test_output_psi_is_small_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(1)
    stable = rng.normal(size=(500, 2))
    assert (output_psi(stable, stable + rng.normal(scale=0.01, size=stable.shape)) or 0) < 0.05
    assert (output_psi(stable, stable + 2) or 0) > 1
    assert output_psi(stable, np.empty((0, 2))) is None


def test_the_config_names_the_canary_and_its_addresses() -> None:
    text = json.dumps(
        {"revision": "abc", "version": "2", "percent": 10, "targets": ["10.0.0.5:8080"]}
    )
    assert ShadowConfig.parse(text) == ShadowConfig("abc", "2", 10.0, (("10.0.0.5", 8080),))
    assert ShadowConfig.parse("") is None
    assert ShadowConfig.parse("{}") is None
    with pytest.raises(ValueError, match="outside"):
        ShadowConfig.parse(json.dumps({"revision": "a", "percent": 150}))


def test_the_file_is_looked_at_once_a_second_and_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "shadow.json"
    now = [0.0]
    source = ShadowFile(path, clock=lambda: now[0])
    assert source.current() is None  # no file: no shadow step
    path.write_text(json.dumps({"revision": "a", "percent": 5, "targets": ["1.2.3.4:80"]}))
    assert source.current() is None  # within the second: not looked at again
    now[0] = 1.5
    config = source.current()
    assert config is not None
    assert config.revision == "a"
    path.write_text("not json, longer than before")
    now[0] = 3.0
    assert source.current() is None  # a broken file mirrors nothing, and says so in the log
    path.unlink()
    now[0] = 4.5
    assert source.current() is None


class FakeCanary:
    """A canary connection that answers with ``answer`` or raises ``failure``."""

    def __init__(self, answer: bytes = b"", failure: MirrorFailure | None = None) -> None:
        self.answer = answer
        self.failure = failure
        self.sent: list[Request] = []
        self.closed = False

    async def send(self, request: Request) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        self.sent.append(request)
        if self.failure is not None:
            raise self.failure
        return 200, [], self.answer

    def close(self) -> None:
        self.closed = True


def answer(probs: Array) -> bytes:
    output = {"name": "p", "datatype": "FP32", "shape": list(probs.shape)}
    return json.dumps({"outputs": [{**output, "data": probs.ravel().tolist()}]}).encode()


class StaticFile(ShadowFile):
    def __init__(self, config: ShadowConfig | None) -> None:
        self.config = config

    def current(self) -> ShadowConfig | None:
        return self.config


CONFIG = ShadowConfig("rev1", "2", 10.0, (("10.0.0.5", 8080),))


def copy_of(config: ShadowConfig = CONFIG) -> Copy:
    request = Request(b"POST", "/v2/models/m/infer", b"", [], http10=False, keep_alive=True)
    return Copy(request, [], answer(PROBS), 0.01, config)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def run_mirror(mirror: Mirror, *batches: list[Copy]) -> None:
    """Each batch submitted at once, sent before the next (one event loop: the queue's)."""

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(mirror.run(stop))
        for copies in batches:
            for copy in copies:
                mirror.submit(copy)
            for _ in range(200):
                await asyncio.sleep(0.01)
                if mirror._queue.empty():
                    break
            await asyncio.sleep(0.05)
        stop.set()
        await task

    asyncio.run(go())


def test_sampling_follows_the_percentage_and_needs_a_canary_address() -> None:
    registry = CollectorRegistry()
    mirror = Mirror(StaticFile(CONFIG), ShadowMetrics(registry), lambda *_: FakeCanary())
    assert mirror.sample(0.05) == CONFIG
    assert mirror.sample(0.10) is None
    no_targets = ShadowConfig("rev1", "2", 100.0, ())
    assert (
        Mirror(
            StaticFile(no_targets), ShadowMetrics(CollectorRegistry()), lambda *_: FakeCanary()
        ).sample(0.0)
        is None
    )


def test_compared_answers_are_counted_per_output_and_a_full_queue_drops() -> None:
    registry = CollectorRegistry()
    canary = FakeCanary(answer(PROBS[:, [0, 2, 1]]))
    mirror = Mirror(StaticFile(CONFIG), ShadowMetrics(registry), lambda *_: canary, queue_size=3)
    run_mirror(mirror, [copy_of() for _ in range(5)])
    labels = {"revision": "rev1"}
    assert (
        sample(registry, "modeldeploy_runtime_shadow_requests_total", result="dropped", **labels)
        == 2
    )
    assert (
        sample(registry, "modeldeploy_runtime_shadow_requests_total", result="compared", **labels)
        == 3
    )
    assert len(canary.sent) == 3
    out = {**labels, "output": "p"}
    assert sample(registry, "modeldeploy_runtime_shadow_rows_total", **out) == 9
    assert sample(registry, "modeldeploy_runtime_shadow_disagreements_total", **out) == 6
    assert canary.closed


@pytest.mark.parametrize("result", ["timeout", "unreachable", "error"])
def test_failed_copies_are_counted_by_kind(result: str) -> None:
    registry = CollectorRegistry()
    canary = FakeCanary(failure=MirrorFailure(result, "boom"))
    mirror = Mirror(StaticFile(CONFIG), ShadowMetrics(registry), lambda *_: canary)
    run_mirror(mirror, [copy_of()])
    total = "modeldeploy_runtime_shadow_requests_total"
    assert sample(registry, total, revision="rev1", result=result) == 1
    assert sample(registry, total, revision="rev1", result="compared") == 0


def test_a_new_canary_revision_starts_its_series_over() -> None:
    registry = CollectorRegistry()
    metrics = ShadowMetrics(registry)
    mirror = Mirror(StaticFile(CONFIG), metrics, lambda *_: FakeCanary(answer(PROBS)))
    newer = ShadowConfig("rev2", "3", 10.0, CONFIG.targets)
    run_mirror(mirror, [copy_of()], [copy_of(newer)])
    total = "modeldeploy_runtime_shadow_requests_total"
    assert sample(registry, total, revision="rev1", result="compared") == 0
    assert sample(registry, total, revision="rev2", result="compared") == 1
