"""Build the control plane's binaries from pinned sources, once, into a cache outside the repo.

The Go module in ``tools/toolchain`` is the single source of truth for versions: its
``go.mod`` requires ``k8s.io/kubernetes``, ``sigs.k8s.io/kwok`` and ``helm.sh/helm/v3`` and
(indirectly) the etcd server Kubernetes was released with; every staging module is replaced
with its published release of the same Kubernetes version. Binaries are version-stamped with
``-ldflags -X`` so ``kubectl version`` and Helm report the real release, not
``v0.0.0-master``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

KUBERNETES_MODULE = "k8s.io/kubernetes"
KWOK_MODULE = "sigs.k8s.io/kwok"
HELM_MODULE = "helm.sh/helm/v3"
ETCD_MODULE = "go.etcd.io/etcd/server/v3"
# Upstream Prometheus, in a Go module of its own (tools/prometheus): Debian's package is built
# without Kubernetes service discovery. Only that discovery is compiled in.
PROMETHEUS_MODULE = "github.com/prometheus/prometheus"
PROMETHEUS_TAGS = ("remove_all_sd", "enable_kubernetes_sd")
# Real stores for the fetcher's tests, in a Go module of their own (tools/objectstores): an
# S3-compatible server (gofakes3, on a folder) and go-containerregistry's OCI registry and
# crane, its client.
GOFAKES3_MODULE = "github.com/johannesboyne/gofakes3"
REGISTRY_MODULE = "github.com/google/go-containerregistry"

BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "kube-proxy",
    "kwok",
    "kwokctl",
    "helm",
    "prometheus",
    "gofakes3",
    "registry",
    "crane",
)
STAMP_FILE = ".toolchain-fingerprint"
# The Gateway API CRDs the tests install come from this module's config/crd/standard.
# (Not in go.mod: nothing imports it, so `go mod tidy` would drop it.)
GATEWAY_API = "sigs.k8s.io/gateway-api@v1.6.3"
KEDA = "github.com/kedacore/keda/v2@v2.21.0"
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
HEARTBEAT_SECONDS = 60.0


class ToolchainError(RuntimeError):
    """The binaries could not be built; the message says which step failed and why."""


@dataclass(frozen=True)
class Versions:
    """The pinned upstream releases, read from the toolchain module's go.mod."""

    kubernetes: str
    kwok: str
    helm: str
    etcd: str


@dataclass(frozen=True)
class BuildStep:
    """One ``go build`` invocation: the binaries it makes and the packages it compiles."""

    binaries: tuple[str, ...]
    packages: tuple[str, ...]
    source: str  # "module version", for progress messages
    module: str = "toolchain"  # the Go module under tools/ it builds in
    tags: tuple[str, ...] = ()

    def build_args(self, out_dir: Path, flags: str) -> list[str]:
        args = ["build", "-trimpath", "-ldflags", flags]
        if self.tags:
            args += ["-tags", ",".join(self.tags)]
        return [*args, *self.output_args(out_dir), *self.packages]

    def output_args(self, out_dir: Path) -> list[str]:
        # A package path ending in /v3 would name its binary "server"; give etcd its name.
        if len(self.packages) == 1:
            return ["-o", str(out_dir / self.binaries[0])]
        return ["-o", f"{out_dir}{os.sep}"]


def parse_go_mod_requires(text: str) -> dict[str, str]:
    """Module -> version for every ``require`` in a go.mod, direct or indirect."""
    requires: dict[str, str] = {}
    in_block = False
    for raw in text.splitlines():
        line = raw.split("//", 1)[0].strip()
        if in_block:
            if line == ")":
                in_block = False
            elif line:
                module, version = line.split()[:2]
                requires[module] = version
        elif line == "require (":
            in_block = True
        elif line.startswith("require "):
            module, version = line.removeprefix("require ").split()[:2]
            requires[module] = version
    return requires


def versions_from_go_mod(text: str) -> Versions:
    """The pinned versions; a go.mod that lacks one of them is a ToolchainError."""
    requires = parse_go_mod_requires(text)
    wanted = {
        "kubernetes": KUBERNETES_MODULE,
        "kwok": KWOK_MODULE,
        "helm": HELM_MODULE,
        "etcd": ETCD_MODULE,
    }
    missing = sorted(module for module in wanted.values() if module not in requires)
    if missing:
        raise ToolchainError(f"tools/toolchain/go.mod does not require {', '.join(missing)}")
    return Versions(**{field: requires[module] for field, module in wanted.items()})


def minor_of(version: str) -> tuple[str, str]:
    """``v1.36.3`` -> ``("1", "36")``."""
    match = re.fullmatch(r"v(\d+)\.(\d+)\.\d+(?:[-+].*)?", version)
    if match is None:
        raise ToolchainError(f"not a release version: {version!r}")
    return match.group(1), match.group(2)


def ldflags(versions: Versions) -> str:
    """Linker flags that strip debug data and stamp every binary with its real version."""
    major, minor = minor_of(versions.kubernetes)
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={versions.kubernetes}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
        ]
    flags += [
        f"-X helm.sh/helm/v3/internal/version.version={versions.helm}",
        "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
    ]
    # Helm's default capabilities (`helm template`, `helm lint`) use these.
    for package in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        flags += [f"-X {package}.k8sVersionMajor={major}", f"-X {package}.k8sVersionMinor={minor}"]
    return " ".join(flags)


def build_steps(versions: Versions, prometheus: str = "") -> tuple[BuildStep, ...]:
    """What to build, smallest first, so a broken setup fails fast."""
    return (
        BuildStep(("etcd",), (ETCD_MODULE,), f"{ETCD_MODULE} {versions.etcd}"),
        BuildStep(
            ("kwok", "kwokctl"),
            (f"{KWOK_MODULE}/cmd/kwok", f"{KWOK_MODULE}/cmd/kwokctl"),
            f"{KWOK_MODULE} {versions.kwok}",
        ),
        BuildStep(
            (
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kubectl",
                "kubelet",
                "kube-proxy",
            ),
            tuple(
                f"{KUBERNETES_MODULE}/cmd/{name}"
                for name in (
                    "kube-apiserver",
                    "kube-controller-manager",
                    "kube-scheduler",
                    "kubectl",
                    "kubelet",
                    "kube-proxy",
                )
            ),
            f"{KUBERNETES_MODULE} {versions.kubernetes}",
        ),
        BuildStep(("helm",), (f"{HELM_MODULE}/cmd/helm",), f"{HELM_MODULE} {versions.helm}"),
        BuildStep(
            ("prometheus",),
            (f"{PROMETHEUS_MODULE}/cmd/prometheus",),
            f"{PROMETHEUS_MODULE} {prometheus}".rstrip(),
            module="prometheus",
            tags=PROMETHEUS_TAGS,
        ),
        BuildStep(
            ("gofakes3", "registry", "crane"),
            (
                f"{GOFAKES3_MODULE}/cmd/gofakes3",
                f"{REGISTRY_MODULE}/cmd/registry",
                f"{REGISTRY_MODULE}/cmd/crane",
            ),
            f"{GOFAKES3_MODULE}, {REGISTRY_MODULE}",
            module="objectstores",
        ),
    )


def fingerprint(go_mod: bytes, go_sum: bytes, flags: str, *more: bytes) -> str:
    """Changes whenever a rebuild is needed: any pinned version or any linker flag."""
    digest = hashlib.sha256()
    for part in (go_mod, go_sum, flags.encode(), *more):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def default_cache_root(environ: Mapping[str, str]) -> Path:
    """``$MODELDEPLOY_CACHE_DIR``, else ``$XDG_CACHE_HOME/modeldeploy``, else ~/.cache/..."""
    if environ.get("MODELDEPLOY_CACHE_DIR"):
        return Path(environ["MODELDEPLOY_CACHE_DIR"])
    xdg = environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "modeldeploy"


def module_dir() -> Path:
    """``tools/toolchain``, beside this package."""
    return Path(__file__).resolve().parent.parent / "toolchain"


@dataclass(frozen=True)
class Toolchain:
    """The pinned binaries: where they live and how to build them."""

    module_dir: Path
    bin_dir: Path
    versions: Versions

    @classmethod
    def locate(cls, environ: Mapping[str, str] | None = None) -> Toolchain:
        environ = os.environ if environ is None else environ
        go_mod = module_dir() / "go.mod"
        versions = versions_from_go_mod(go_mod.read_text())
        bin_dir = default_cache_root(environ) / "bin" / versions.kubernetes
        return cls(module_dir=module_dir(), bin_dir=bin_dir, versions=versions)

    def path(self, binary: str) -> Path:
        if binary not in BINARIES:
            raise KeyError(binary)
        return self.bin_dir / binary

    @property
    def modules(self) -> dict[str, Path]:
        """The Go modules under tools/ that binaries are built in."""
        return {
            "toolchain": self.module_dir,
            "prometheus": self.module_dir.parent / "prometheus",
            "objectstores": self.module_dir.parent / "objectstores",
        }

    def prometheus_version(self) -> str:
        requires = parse_go_mod_requires((self.modules["prometheus"] / "go.mod").read_text())
        return requires.get(PROMETHEUS_MODULE, "")

    def fingerprint(self) -> str:
        prometheus = self.modules["prometheus"]
        return fingerprint(
            (self.module_dir / "go.mod").read_bytes(),
            (self.module_dir / "go.sum").read_bytes(),
            ldflags(self.versions),
            (prometheus / "go.mod").read_bytes(),
            (prometheus / "go.sum").read_bytes(),
            ",".join(PROMETHEUS_TAGS).encode(),
            (self.modules["objectstores"] / "go.mod").read_bytes(),
            (self.modules["objectstores"] / "go.sum").read_bytes(),
        )

    def is_built(self) -> bool:
        stamp = self.bin_dir / STAMP_FILE
        return (
            stamp.is_file()
            and stamp.read_text().strip() == self.fingerprint()
            and all(os.access(self.path(name), os.X_OK) for name in BINARIES)
        )

    def ensure_built(self, out: TextIO = sys.stderr) -> bool:
        """Build every binary unless the cache already holds this exact toolchain.

        Returns True when it built something. Binaries are built into a temporary folder
        beside the cache and moved in only when all succeeded, so an interrupted build never
        leaves a half-made toolchain that looks complete.
        """
        if self.is_built():
            return False
        if shutil.which("go") is None:
            raise ToolchainError("`go` is not on PATH; install Go >= 1.26 (see README)")
        self.bin_dir.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        print(f"[toolchain] building the local control plane into {self.bin_dir}", file=out)
        print(
            "[toolchain] the first build compiles Kubernetes from source (5-10 min on 2 cores);"
            " later runs reuse the cache",
            file=out,
        )
        stamp = self.fingerprint()
        staging = Path(tempfile.mkdtemp(prefix="build-", dir=self.bin_dir.parent))
        try:
            for name, folder in self.modules.items():
                self._go(["mod", "download"], f"downloading Go modules ({name})", out, folder)
            flags = ldflags(self.versions)
            for step in build_steps(self.versions, self.prometheus_version()):
                self._go(
                    step.build_args(staging, flags),
                    f"building {', '.join(step.binaries)} from {step.source}",
                    out,
                    self.modules[step.module],
                )
            (staging / STAMP_FILE).write_text(stamp + "\n")
            if self.bin_dir.exists():
                shutil.rmtree(self.bin_dir)
            staging.rename(self.bin_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        print(f"[toolchain] done in {format_duration(time.monotonic() - started)}", file=out)
        return True

    def gateway_api_crds(self) -> list[Path]:
        """The standard-channel Gateway API CRD files, downloaded through the module proxy."""
        return self.module_files(GATEWAY_API, "config/crd/standard", "*.yaml")

    def keda_crds(self) -> list[Path]:
        """KEDA's CRD files (ScaledObject and friends), from its published module."""
        return self.module_files(KEDA, "config/crd/bases", "keda.sh_*.yaml")

    def prometheus_operator_crds(self) -> list[Path]:
        """The Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule, ...)."""
        return self.module_files(
            PROMETHEUS_OPERATOR, "example/prometheus-operator-crd", "monitoring.coreos.com_*.yaml"
        )

    def module_files(self, module: str, folder: str, pattern: str) -> list[Path]:
        """Files of a published Go module, downloaded through the module proxy (cached)."""
        result = subprocess.run(
            ["go", "mod", "download", "-json", module],
            cwd=self.module_dir,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ToolchainError(f"cannot download {module}: {result.stdout}{result.stderr}")
        found = sorted((Path(json.loads(result.stdout)["Dir"]) / folder).glob(pattern))
        if not found:
            raise ToolchainError(f"{module} has no {folder}/{pattern}")
        return found

    def _go(self, args: Sequence[str], what: str, out: TextIO, cwd: Path) -> None:
        """Run one go command, printing a heartbeat while it works and its time when done."""
        print(f"[toolchain] {what} ...", file=out, flush=True)
        env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly"}
        started = time.monotonic()
        with subprocess.Popen(
            ["go", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc:
            while True:
                try:
                    output, _ = proc.communicate(timeout=HEARTBEAT_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = format_duration(time.monotonic() - started)
                    print(f"[toolchain]   still {what}: {elapsed}", file=out, flush=True)
        elapsed = format_duration(time.monotonic() - started)
        if proc.returncode != 0:
            raise ToolchainError(f"{what} failed after {elapsed}:\n{output.strip()}")
        print(f"[toolchain]   {what}: {elapsed}", file=out, flush=True)
