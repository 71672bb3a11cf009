"""The node cache's labels, decided from the pods' fetch reports."""

from __future__ import annotations

import json
from typing import Any

from modeldeploy_operator.nodecache import labels_to_add

DIGEST = "sha256:" + "d" * 64
LABEL = "cache.modeldeploy.io/sha256." + "d" * 48


def pod(node: str | None, report: dict[str, Any] | None, code: int = 0) -> dict[str, Any]:
    done = {"exitCode": code, "message": json.dumps(report) if report is not None else ""}
    status = {"initContainerStatuses": [{"name": "fetch-model", "state": {"terminated": done}}]}
    return {"spec": {"nodeName": node} if node else {}, "status": status}


def test_a_node_is_labelled_once_for_each_archive_its_cache_holds() -> None:
    pods = [
        pod("n1", {"digest": DIGEST, "cache": True, "warm": False}),
        pod("n1", {"digest": DIGEST, "cache": True, "warm": True}),  # the same label
        pod("n2", {"digest": DIGEST, "cache": False}),  # fetched without the cache
        pod("n3", {"cache": True}),  # no digest
        pod(None, {"digest": DIGEST, "cache": True}),  # not scheduled
        pod("n4", {"digest": DIGEST, "cache": True}, code=1),  # failed
    ]
    assert labels_to_add(pods, frozenset()) == {("n1", LABEL)}
    assert labels_to_add(pods, frozenset({("n1", LABEL)})) == set()
