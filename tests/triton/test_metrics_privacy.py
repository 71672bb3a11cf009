"""Metrics privacy and cardinality (reliability case 41), on a real sidecar in front of a real
Triton, over a whole ``/metrics`` scrape rather than one metric at a time.

A scrape is public to whoever can reach the metrics port, and every label value is a series
that Prometheus keeps: so no request's content (feature values, request ids, the model names
strangers ask for, their keys) may appear in it, label names come from a short allowlist,
and strangers' traffic mints no series of its own.
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from modeldeploy_runtime.drift import Profile, profile_features
from triton_support import Sidecar, SidecarFactory

pytestmark = pytest.mark.triton

KEYS = 60  # valid API keys, each one client
ALLOWED_LABELS = {"model", "version", "track", "code", "reason", "client", "outcome", "kind"}
ALLOWED_LABELS |= {"feature", "le"}  # a profiled feature's name; a histogram's bucket
ALLOWED_TYPES = {"counter", "gauge", "histogram"}
CLIENT = re.compile(r"key-[0-9a-f]{16}|unknown|other")
SENTINEL = 91357.0  # feature values sent are SENTINEL + i: never a label


def scrape_text(sidecar: Sidecar) -> str:
    with urllib.request.urlopen(f"http://{sidecar.metrics}/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


def series(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], str]:
    """Every series, as (its family, its labels but a bucket's ``le``) -> the family's type:
    a histogram's buckets, sum, count and created are one label set."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            found[(family.name, labels)] = family.type
    return found


def infer(sidecar: Sidecar, model: str, key: str, value: float, request_id: str) -> str:
    client = httpclient.InferenceServerClient(sidecar.http)
    x = httpclient.InferInput("x", [2, 4], "FP32")
    x.set_data_from_numpy(np.full((2, 4), value, np.float32), binary_data=False)
    headers = {"X-API-Key": key, "X-Request-ID": request_id}
    try:
        client.infer(model, [x], headers=headers, request_id=request_id)
    except InferenceServerException as error:
        return str(error.status())
    return "200"


def test_a_whole_scrape_holds_no_request_content_and_strangers_mint_no_series(
    sidecar: SidecarFactory, tmp_path: Path
) -> None:
    keys = [f"secret-key-{uuid.uuid4().hex}" for _ in range(KEYS)]
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "clients").write_text("\n".join(keys) + "\n")
    reference = np.random.default_rng(3).normal(size=(5000, 4))
    profile = Profile(
        inputs={"x": profile_features("x", reference, 10)},
        outputs={"score": profile_features("score", reference.sum(axis=1, keepdims=True), 10)},
    )
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "profile.json").write_text(json.dumps(profile.to_json()))
    proxy = sidecar(
        model="features",
        api_keys_dir=tmp_path / "keys",
        reference_profile=tmp_path / "profile",
        sample_rate=1.0,
    )
    sent: list[str] = [*keys]

    # Every client, with values and request ids of its own.
    for i, key in enumerate(keys):
        request_id = f"req-{uuid.uuid4().hex}"
        sent.append(request_id)
        assert infer(proxy, "features", key, SENTINEL + i, request_id) == "200"
    known = series(scrape_text(proxy))

    # Strangers: wrong keys, models that do not exist, more ids and values, from a valid key.
    for i in range(100):
        junk, model, request_id = (f"{p}-{uuid.uuid4().hex}" for p in ("junk", "model", "req"))
        sent += [junk, model, request_id]
        assert infer(proxy, "features", junk, SENTINEL - i, request_id) == "401"
        assert infer(proxy, model, keys[i % KEYS], SENTINEL * 2 + i, request_id) in ("400", "404")
    text = scrape_text(proxy)
    after = series(text)

    assert set(after.values()) <= ALLOWED_TYPES
    labels = {name for family in text_string_to_metric_families(text)
              for sample in family.samples for name in sample.labels}  # fmt: skip
    assert labels <= ALLOWED_LABELS, labels - ALLOWED_LABELS
    clients = {value for (_, pairs) in after for name, value in pairs if name == "client"}
    assert len(clients) >= KEYS, clients  # each key is counted, under its salted hash
    assert all(CLIENT.fullmatch(c) for c in clients), clients
    for secret in sent:
        assert secret not in text, secret
    assert str(int(SENTINEL)) not in text
    # 300 strangers' requests added a handful of series (the "unknown" client, the "other"
    # model, their codes), not one per key, model, id or value.
    minted = set(after) - set(known)
    assert len(minted) <= 10, sorted(minted)
    print(f"{len(after)} series after {KEYS} clients; strangers' 300 requests added {len(minted)}")
