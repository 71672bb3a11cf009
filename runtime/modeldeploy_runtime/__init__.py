"""modeldeploy's runtime sidecar: an inference proxy in front of Triton that exports latency
and drift metrics to Prometheus.

It runs in every model pod, so it must stay light: it never imports kopf or kubernetes
(import-linter checks it).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("modeldeploy")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
