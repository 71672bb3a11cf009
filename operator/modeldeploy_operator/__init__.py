"""modeldeploy's Kubernetes operator: reconciles ModelDeployments into Triton Deployments.

Layering (see docs/architecture.md): handlers -> reconcile -> pure logic (builders, rollout,
autoscaling) -> api models. Only ``k8s`` talks to the Kubernetes API and only ``metrics`` to
Prometheus; each layer gets an import-linter contract in ``.importlinter`` as it lands.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("modeldeploy")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
