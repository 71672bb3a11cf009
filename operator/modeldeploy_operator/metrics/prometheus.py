"""The only code of ours that talks to Prometheus: an instant query, one number back.

:class:`MetricsProvider` is the narrow interface analysis needs (after Argo Rollouts'
``metric.Provider``): ``query(promql) -> float | None``. ``None`` means no data (an empty
result); an unreachable Prometheus, a bad query or an ambiguous result raise
:class:`ProviderError`. Both are inconclusive for the analysis, never success.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Protocol

Fetch = Callable[[str, float], bytes]


class ProviderError(RuntimeError):
    """The query could not be answered; the message says why."""


class MetricsProvider(Protocol):
    def query(self, promql: str) -> float | None: ...


def http_fetch(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as error:
        return error.read()  # Prometheus explains 4xx/5xx in a JSON body
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise ProviderError(f"Prometheus unreachable: {getattr(error, 'reason', error)}") from error


def parse_result(body: bytes) -> float | None:
    """The single value of an instant-query response; None for an empty result."""
    try:
        document = json.loads(body)
    except ValueError as error:
        raise ProviderError("Prometheus answered something that is not JSON") from error
    if document.get("status") != "success":
        raise ProviderError(
            f"{document.get('errorType', 'error')}: {document.get('error', 'unknown')}"
        )
    data = document.get("data", {})
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return _number(result[1])
    if kind != "vector":
        raise ProviderError(f"expected a vector or scalar, got {kind}")
    if not result:
        return None
    if len(result) > 1:
        raise ProviderError(f"expected one series, got {len(result)}: aggregate the query")
    return _number(result[0]["value"][1])


def _number(text: str) -> float | None:
    value = float(text)
    return None if math.isnan(value) else value


class PrometheusProvider:
    def __init__(self, url: str, timeout: float = 5.0, fetch: Fetch = http_fetch) -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ProviderError(f"not an http(s) URL: {url}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._fetch = fetch

    def query(self, promql: str) -> float | None:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        return parse_result(self._fetch(url, self.timeout))
