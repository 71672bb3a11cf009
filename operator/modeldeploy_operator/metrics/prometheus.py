"""The only code of ours that talks to Prometheus: an instant query, one number back.

:class:`MetricsProvider` is the narrow interface analysis needs (after Argo Rollouts'
``metric.Provider``): ``query(promql) -> float | None``. ``None`` means no data (an empty
result); an unreachable Prometheus, a bad query or an ambiguous result raise
:class:`ProviderError`. Both are inconclusive for the analysis, never success.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol

Fetch = Callable[[str, float], bytes]

DEFAULT_TIMEOUT = 5.0  # seconds; the operator's --prometheus-timeout
MAX_BODY_BYTES = 4 * 1024 * 1024  # an instant query for one number answers in a few hundred
CHUNK_BYTES = 64 * 1024


class ProviderError(RuntimeError):
    """The query could not be answered; the message says why."""


class MetricsProvider(Protocol):
    def query(self, promql: str) -> float | None: ...

    def query_by(self, promql: str, label: str) -> dict[str, float]: ...


def http_fetch(url: str, timeout: float) -> bytes:
    """GET ``url``. ``timeout`` bounds every wait on the network (connect, each read) and the
    whole body: a server that accepts and never answers, or trickles its answer, costs at
    most about ``timeout`` seconds (twice that in the worst case), never a hung reconcile."""
    deadline = time.monotonic() + timeout
    try:
        try:
            response: Any = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - http(s) only
        except urllib.error.HTTPError as error:
            response = error  # Prometheus explains 4xx/5xx in a JSON body
        with response:
            return read_body(response, deadline, timeout)
    except ProviderError:
        raise
    except TimeoutError as error:
        raise ProviderError(f"Prometheus did not answer within {timeout:g} s") from error
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, TimeoutError):
            raise ProviderError(f"Prometheus did not answer within {timeout:g} s") from error
        raise ProviderError(f"Prometheus unreachable: {reason}") from error
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise ProviderError(f"Prometheus unreachable: {error!r}") from error


def read_body(response: Any, deadline: float, timeout: float) -> bytes:
    """The body, one socket read at a time, within ``deadline`` and :data:`MAX_BODY_BYTES`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise ProviderError(f"Prometheus did not answer within {timeout:g} s")
        chunk: bytes = response.read1(CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ProviderError(f"Prometheus answered more than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)


def parse_result(body: bytes) -> float | None:
    """The single value of an instant-query response; None for an empty result or NaN (0/0:
    no traffic). Anything else that is not one finite number raises :class:`ProviderError`,
    never another exception: a malformed answer is inconclusive, not a failed reconcile."""
    try:
        document = json.loads(body)
    except ValueError as error:  # UnicodeDecodeError too
        raise ProviderError(
            f"Prometheus answered something that is not JSON: {_excerpt(body)}"
        ) from error
    if not isinstance(document, dict):
        raise ProviderError(f"Prometheus answered JSON that is not an object: {_excerpt(body)}")
    if document.get("status") != "success":
        raise ProviderError(
            f"{document.get('errorType', 'error')}: {document.get('error', 'unknown')}"[:512]
        )
    data = document.get("data")
    if not isinstance(data, dict):
        raise ProviderError(f"Prometheus answered without data: {_excerpt(body)}")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return _sample(result)
    if kind != "vector":
        raise ProviderError(f"expected a vector or scalar, got {str(kind)[:64]}")
    if not isinstance(result, list):
        raise ProviderError(f"expected a list of series, got {_excerpt(result)}")
    if not result:
        return None
    if len(result) > 1:
        raise ProviderError(f"expected one series, got {len(result)}: aggregate the query")
    series = result[0]
    if not isinstance(series, dict) or "value" not in series:
        raise ProviderError(f"expected a series with a value, got {_excerpt(series)}")
    return _sample(series["value"])


def parse_vector(body: bytes, label: str) -> dict[str, float]:
    """Every series of an instant-query vector, by the value of ``label`` (NaN left out)."""
    try:
        document = json.loads(body)
        if document.get("status") != "success":
            raise ProviderError(
                f"{document.get('errorType', 'error')}: {document.get('error', 'unknown')}"[:512]
            )
        result = document["data"]["result"]
        pairs = [(series["metric"].get(label, ""), _sample(series["value"])) for series in result]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ProviderError(f"Prometheus answered no vector: {_excerpt(body)}") from error
    return {str(key): value for key, value in pairs if value is not None}


def _sample(sample: object) -> float | None:
    """``[<time>, "<value>"]`` -> the value; Prometheus writes numbers as strings."""
    if not (isinstance(sample, list) and len(sample) == 2 and isinstance(sample[1], str)):
        raise ProviderError(f'expected a sample [time, "value"], got {_excerpt(sample)}')
    try:
        value = float(sample[1])
    except ValueError as error:
        raise ProviderError(f"the value is not a number: {_excerpt(sample[1])}") from error
    if math.isnan(value):
        return None
    if math.isinf(value):
        raise ProviderError(f"the value is {sample[1]}: the query divides by zero or overflows")
    return value


def _excerpt(value: object) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else repr(value)
    return text if len(text) <= 100 else text[:100] + "..."


class PrometheusProvider:
    def __init__(
        self, url: str, timeout: float = DEFAULT_TIMEOUT, fetch: Fetch = http_fetch
    ) -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ProviderError(f"not an http(s) URL: {url}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._fetch = fetch

    def query(self, promql: str) -> float | None:
        # Prometheus also stops evaluating at the same timeout (float seconds are accepted).
        params = {"query": promql, "timeout": f"{self.timeout:g}"}
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        return parse_result(self._fetch(url, self.timeout))

    def query_by(self, promql: str, label: str) -> dict[str, float]:
        """One value per series of a vector query, by ``label``."""
        params = {"query": promql, "timeout": f"{self.timeout:g}"}
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        return parse_vector(self._fetch(url, self.timeout), label)
