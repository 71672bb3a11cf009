"""The project's container images, built here with podman from Dockerfiles and cached by content.

Five images, all named ``localhost/modeldeploy-<name>:<key>``:

``base``
    Debian 12 from ``debootstrap --variant=minbase``, imported with ``podman import``; apt
    works in later builds (deb822 sources for the main, updates and security suites).
``pause``
    Kubernetes' own ``build/pause/linux/pause.c`` from the pinned ``k8s.io/kubernetes``
    module, compiled with ``gcc -Os -static`` into ``tools/images/pause/Dockerfile``
    (``FROM scratch``). registry.k8s.io is unreachable here; the source stays out of the repo.
``triton-cpu``
    A CPU-only Triton server from nvidia-pytriton's wheel (``tools/images/triton-cpu``).
``runtime`` and ``operator``
    ``runtime/Dockerfile`` and ``operator/Dockerfile`` FROM the Debian base.

The key is 12 hex digits of a SHA-256 over everything that decides an image: its Dockerfile,
the key of its base image, every file the build copies (what git tracks, or would track, under
the copied paths) and, for the base and pause images, their recipe. Each image is kept as an
OCI archive ``<cache>/images/<name>-<key>.tar``; when that archive exists nothing is built and
podman's store need not hold the image. Builds run with ``--network host`` (pip and apt reach
their mirrors) and get the host's CA bundle as the build secret ``cacert``, never as a layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO

from localcluster.toolchain import (
    KUBERNETES_MODULE,
    ToolchainError,
    default_cache_root,
    format_duration,
    versions_from_go_mod,
)

# Bump to rebuild every image, e.g. after a change to how this module builds them.
RECIPE_VERSION = "1"
IMAGE_PREFIX = "localhost/modeldeploy-"
KEY_LENGTH = 12
ALL = ("base", "pause", "triton-cpu", "runtime", "operator")
HEARTBEAT_SECONDS = 60.0
# podman cannot raise RLIMIT_NOFILE here (no CAP_SYS_RESOURCE): without these, every
# `podman run` and `podman build` fails with "error setting rlimit type 7".
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
CONTAINERD_NAMESPACE = "k8s.io"
CA_SECRET = "cacert"  # noqa: S105 - the name of a build secret, not a secret
HOST_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
PAUSE_SOURCE = "build/pause/linux/pause.c"
PAUSE_MAKEFILE = "build/pause/Makefile"
PAUSE_CFLAGS = ("-Os", "-Wall", "-Werror", "-static")
# Never part of a build context or a key: caches and packaging leftovers.
SKIPPED_DIRS = frozenset({".git", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"})
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".egg-info")
# The Debian packages that provide the commands this module runs.
PACKAGES = (
    ("podman", "podman"),
    ("debootstrap", "debootstrap"),
    ("tar", "tar"),
    ("gcc", "gcc libc6-dev"),
    ("ctr", "containerd"),
)


class ImageError(RuntimeError):
    """An image could not be built, saved or imported; the message says why, in one line
    when a prerequisite is missing."""


@dataclass(frozen=True)
class BuiltImage:
    """An image saved in the cache: its short name, full reference and OCI archive."""

    name: str
    reference: str
    archive: Path

    @property
    def repository(self) -> str:
        """The reference without its tag: ``localhost/modeldeploy-runtime``."""
        return self.reference.rsplit(":", 1)[0]

    @property
    def key(self) -> str:
        return self.reference.rsplit(":", 1)[1]


@dataclass(frozen=True)
class DebianBase:
    """How the base image's root filesystem is made; every field is part of its key."""

    suite: str = "bookworm"
    variant: str = "minbase"
    mirror: str = "http://deb.debian.org/debian"
    security_mirror: str = "http://deb.debian.org/debian-security"

    def debootstrap_args(self, target: Path) -> list[str]:
        return [f"--variant={self.variant}", self.suite, str(target), self.mirror]

    def sources(self) -> str:
        """``/etc/apt/sources.list.d/debian.sources`` (deb822), as Debian's own images have."""
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        return (
            f"Types: deb\nURIs: {self.mirror}\nSuites: {self.suite} {self.suite}-updates\n"
            f"Components: main\nSigned-By: {keyring}\n\n"
            f"Types: deb\nURIs: {self.security_mirror}\nSuites: {self.suite}-security\n"
            f"Components: main\nSigned-By: {keyring}\n"
        )

    def apt_config(self) -> str:
        """Like Debian's own images: no recommends, and no package cache left in a layer."""
        clean = (
            '"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb'
            ' /var/cache/apt/*.bin || true"'
        )
        return (
            'APT::Install-Recommends "false";\n'
            'APT::Install-Suggests "false";\n'
            f"DPkg::Post-Invoke {{ {clean}; }};\n"
            f"APT::Update::Post-Invoke {{ {clean}; }};\n"
            'Dir::Cache::pkgcache "";\n'
            'Dir::Cache::srcpkgcache "";\n'
        )

    def image_config(self) -> list[str]:
        """``podman import --change`` instructions: the environment Debian's images set."""
        return [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["/bin/bash"]',
        ]

    def recipe(self) -> list[tuple[str, bytes]]:
        return [
            ("debootstrap", " ".join(self.debootstrap_args(Path("ROOT"))).encode()),
            ("sources", self.sources().encode()),
            ("apt", self.apt_config().encode()),
            ("config", "\n".join(self.image_config()).encode()),
        ]


@dataclass(frozen=True)
class ImageSpec:
    """One of our images: what it is built from and what its key covers."""

    name: str
    dockerfile: str | None  # repository-relative; None for the debootstrapped base
    copies: tuple[str, ...] = ()  # repository-relative paths the build copies: its context
    base: str | None = None  # the image passed as ``--build-arg BASE=<reference>``
    needs: tuple[str, ...] = ()  # commands the build runs besides podman


def specs() -> dict[str, ImageSpec]:
    """Every image this module builds, by name, in dependency order."""
    project = ("pyproject.toml", "README.md", "operator", "runtime")
    return {
        "base": ImageSpec("base", None, needs=("debootstrap", "tar")),
        "pause": ImageSpec("pause", "tools/images/pause/Dockerfile", needs=("go", "gcc")),
        "triton-cpu": ImageSpec("triton-cpu", "tools/images/triton-cpu/Dockerfile", base="base"),
        "runtime": ImageSpec("runtime", "runtime/Dockerfile", project, base="base"),
        "operator": ImageSpec("operator", "operator/Dockerfile", project, base="base"),
    }


def missing_tool_message(command: str) -> str:
    """One line naming what to install when ``command`` is not on PATH."""
    if command == "go":
        return (
            "`go` is not on PATH; install Go >= 1.26 from go.dev (Debian's golang-go is too old;"
            " see README)"
        )
    package = dict(PACKAGES).get(command, command)
    return f"`{command}` is not on PATH; install it with: apt-get install {package}"


def with_dependencies(names: Iterable[str]) -> list[str]:
    """The requested images and the images they are built FROM, in build order."""
    known = specs()
    wanted: set[str] = set()
    for name in names:
        if name not in known:
            raise ImageError(f"unknown image {name!r}; known: {', '.join(ALL)}")
        current: str | None = name
        while current is not None:
            wanted.add(current)
            current = known[current].base
    return [name for name in ALL if name in wanted]


def content_key(parts: Iterable[tuple[str, bytes]]) -> str:
    """12 hex digits of SHA-256 over labelled parts; lengths are hashed so parts cannot merge."""
    digest = hashlib.sha256(f"modeldeploy-images {RECIPE_VERSION}".encode())
    for label, data in parts:
        for chunk in (label.encode(), data):
            digest.update(len(chunk).to_bytes(8, "big"))
            digest.update(chunk)
    return digest.hexdigest()[:KEY_LENGTH]


def is_skipped(relative: str) -> bool:
    """Caches and packaging leftovers (``__pycache__``, ``*.egg-info``, ``*.pyc``)."""
    parts = relative.split("/")
    return any(part in SKIPPED_DIRS or part.endswith(SKIPPED_SUFFIXES) for part in parts)


def _git_listing(root: Path, paths: Sequence[str]) -> list[str] | None:
    """Tracked and untracked-but-not-ignored files under paths, or None outside a git tree."""
    if shutil.which("git") is None:
        return None
    result = subprocess.run(
        [
            *("git", "-C", str(root), "ls-files", "-z"),
            *("--cached", "--others", "--exclude-standard", "--", *paths),
        ],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    return [name for name in result.stdout.decode().split("\0") if name]


def _walk_listing(root: Path, paths: Sequence[str]) -> list[str]:
    found: list[str] = []
    for path in paths:
        top = root / path
        if top.is_file():
            found.append(path)
            continue
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not is_skipped(d)]
            base = Path(folder).relative_to(root).as_posix()
            found += [f"{base}/{name}" for name in files]
    return found


def context_files(root: Path, paths: Sequence[str]) -> list[str]:
    """The files a build copies from ``paths`` (relative to ``root``), sorted.

    In a git work tree: the files git tracks or would track (``.gitignore`` applies);
    elsewhere every file. Caches and ``*.egg-info`` are skipped either way, and so is a
    tracked file deleted from the work tree.
    """
    if not paths:
        return []
    listing = _git_listing(root, paths)
    if listing is None:
        listing = _walk_listing(root, paths)
    return sorted({name for name in listing if not is_skipped(name) and (root / name).is_file()})


def file_parts(root: Path, files: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """Key parts for files: path, executable bit (all git keeps of the mode) and content."""
    for name in files:
        path = root / name
        executable = "x" if path.stat().st_mode & stat.S_IXUSR else "-"
        yield f"file {executable} {name}", path.read_bytes()


def image_key(
    dockerfile: bytes,
    base_key: str | None = None,
    files: Iterable[tuple[str, bytes]] = (),
    recipe: Iterable[tuple[str, bytes]] = (),
) -> str:
    """The content key of one image."""
    parts: list[tuple[str, bytes]] = [("dockerfile", dockerfile)]
    if base_key is not None:
        parts.append(("base", base_key.encode()))
    parts += [(f"recipe {label}", data) for label, data in recipe]
    parts += list(files)
    return content_key(parts)


def declared_args(dockerfile: str) -> dict[str, str | None]:
    """``ARG`` names a Dockerfile declares, with their defaults (None when it has none)."""
    args: dict[str, str | None] = {}
    for raw in dockerfile.splitlines():
        line = raw.strip()
        if not line.upper().startswith("ARG "):
            continue
        for word in line[4:].split():
            name, equals, default = word.partition("=")
            args[name] = default.strip("\"'") if equals else None
    return args


def build_command(
    podman: str,
    reference: str,
    dockerfile: Path,
    context: Path,
    build_args: Mapping[str, str] | None = None,
    secrets: Mapping[str, Path] | None = None,
) -> list[str]:
    """``podman build`` for one image: host network, our ulimits, never a registry pull."""
    command = [podman, "build", "--network", "host", *ULIMITS, "--pull=never"]
    command += ["--file", str(dockerfile), "--tag", reference]
    for name, value in sorted((build_args or {}).items()):
        command += ["--build-arg", f"{name}={value}"]
    for name, path in sorted((secrets or {}).items()):
        command += ["--secret", f"id={name},src={path}"]
    return [*command, str(context)]


def ctr_import_command(ctr: str, address: Path | str, image: BuiltImage) -> list[str]:
    """``ctr images import`` into the CRI namespace under exactly ``image.reference``.

    podman's OCI archive names the image in ``org.opencontainers.image.ref.name``; with
    ``--base-name`` ctr keeps that name when it starts with the repository (and turns a bare
    tag into ``<base-name>:<tag>``), so the image arrives as ``image.reference``.
    """
    return [
        ctr,
        "--address",
        str(address),
        "--namespace",
        CONTAINERD_NAMESPACE,
        "images",
        "import",
        "--base-name",
        image.repository,
        "--digests=false",
        str(image.archive),
    ]


def pause_tag(makefile: str) -> str | None:
    """The pause image's version from Kubernetes' ``build/pause/Makefile`` (``TAG ?= 3.10``)."""
    match = re.search(r"^TAG\s*\?=\s*(\S+)", makefile, re.MULTILINE)
    return match.group(1) if match else None


def host_ca_bundle(environ: Mapping[str, str]) -> Path | None:
    """The CA bundle pip on this host trusts (an intercepting proxy's CA is in it)."""
    candidates = [environ.get("PIP_CERT"), environ.get("SSL_CERT_FILE"), *HOST_CA_BUNDLES]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def toolchain_module(repo: Path) -> Path:
    """The Go module that pins Kubernetes: ``tools/toolchain`` (or, before the move, tests/)."""
    for candidate in (repo / "tools" / "toolchain", repo / "tests" / "toolchain"):
        if (candidate / "go.mod").is_file():
            return candidate
    raise ImageError(f"no toolchain module (tools/toolchain/go.mod) in {repo}")


def kubernetes_version(repo: Path) -> str:
    return versions_from_go_mod((toolchain_module(repo) / "go.mod").read_text()).kubernetes


def _unmount_below(root: Path) -> None:
    """Lazily unmount whatever an interrupted debootstrap left mounted under ``root``."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    inside = [
        line.split()[1]
        for line in mounts
        if len(line.split()) > 1
        and (line.split()[1] == str(root) or line.split()[1].startswith(f"{root}/"))
    ]
    for mount in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)


def _megabytes(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


class Images:
    """Builds the images that are missing from the cache, and imports them into containerd."""

    def __init__(
        self, repo: Path, cache_root: Path, kubernetes_version: str, out: TextIO = sys.stderr
    ) -> None:
        self.repo = repo.resolve()
        self.archive_dir = cache_root / "images"
        self.kubernetes_version = kubernetes_version
        self.out = out
        self.debian = DebianBase()
        self._specs = specs()
        self._keys: dict[str, str] = {}

    # -- names and keys --------------------------------------------------------------------

    def key(self, name: str) -> str:
        if name not in self._keys:
            self._keys[name] = self._compute_key(name)
        return self._keys[name]

    def _compute_key(self, name: str) -> str:
        spec = self._specs[name]
        if spec.dockerfile is None:
            return image_key(b"", recipe=self.debian.recipe())
        dockerfile = (self.repo / spec.dockerfile).read_bytes()
        recipe: list[tuple[str, bytes]] = []
        if name == "pause":
            recipe = [
                ("module", f"{KUBERNETES_MODULE}@{self.kubernetes_version}".encode()),
                ("source", PAUSE_SOURCE.encode()),
                ("cflags", " ".join(PAUSE_CFLAGS).encode()),
            ]
        base_key = None if spec.base is None else self.key(spec.base)
        files = file_parts(self.repo, context_files(self.repo, spec.copies))
        return image_key(dockerfile, base_key, files, recipe)

    def image(self, name: str) -> BuiltImage:
        """Where ``name`` is, or will be once built: its reference and archive path."""
        key = self.key(name)
        return BuiltImage(
            name=name,
            reference=f"{IMAGE_PREFIX}{name}:{key}",
            archive=self.archive_dir / f"{name}-{key}.tar",
        )

    # -- building --------------------------------------------------------------------------

    def ensure_built(self, names: Iterable[str] = ALL) -> dict[str, BuiltImage]:
        """Build what the cache lacks, bases first; returns the requested images and their
        bases, by name."""
        order = with_dependencies(names)
        missing = [name for name in order if not self.image(name).archive.is_file()]
        for name in missing:  # every prerequisite first, not after a long build
            for command in ("podman", *self._specs[name].needs):
                self._require(command)
        result: dict[str, BuiltImage] = {}
        for name in order:
            image = self.image(name)
            if image.archive.is_file():
                self._say(f"{name} is up to date: {image.reference}")
            else:
                self._build(image)
            result[name] = image
        return result

    def _build(self, image: BuiltImage) -> None:
        spec = self._specs[image.name]
        self.archive_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self._say(f"building {image.name} ({image.reference})")
        if spec.base is not None:
            self._ensure_in_store(self.image(spec.base))
        if image.name == "base":
            self._build_base(image)
        elif image.name == "pause":
            self._build_pause(image, self.repo / str(spec.dockerfile))
        else:
            self._build_dockerfile(image, spec)
        self._save(image)
        self._prune(image)
        elapsed = format_duration(time.monotonic() - started)
        self._say(f"built {image.name} in {elapsed} ({_megabytes(image.archive)} archive)")

    def _build_base(self, image: BuiltImage) -> None:
        staging = Path(tempfile.mkdtemp(prefix=".base-", dir=self.archive_dir))
        rootfs = staging / "rootfs"
        try:
            self._run(
                ["debootstrap", *self.debian.debootstrap_args(rootfs)],
                f"debootstrap {self.debian.variant} {self.debian.suite}",
            )
            self._prepare_rootfs(rootfs)
            changes = [arg for change in self.debian.image_config() for arg in ("--change", change)]
            with subprocess.Popen(
                ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
                stdout=subprocess.PIPE,
            ) as tar:
                self._run(
                    ["podman", "import", *changes, "-", image.reference],
                    "podman import of the root filesystem",
                    stdin=tar.stdout,
                )
            if tar.returncode != 0:
                raise ImageError(f"tar of {rootfs} failed with exit status {tar.returncode}")
        finally:
            _unmount_below(staging)
            shutil.rmtree(staging, ignore_errors=True)

    def _prepare_rootfs(self, rootfs: Path) -> None:
        """apt sources for later builds; no package lists, caches or host files in the image."""
        apt = rootfs / "etc" / "apt"
        (apt / "sources.list").unlink(missing_ok=True)
        (apt / "sources.list.d" / "debian.sources").write_text(self.debian.sources())
        (apt / "apt.conf.d" / "90modeldeploy").write_text(self.debian.apt_config())
        for pattern in (
            "var/lib/apt/lists/*_*",
            "var/cache/apt/*.bin",
            "var/cache/apt/archives/*.deb",
        ):
            for entry in rootfs.glob(pattern):
                entry.unlink()
        for host_file in ("etc/hostname", "etc/resolv.conf"):  # copied from this machine
            path = rootfs / host_file
            if path.is_file() and not path.is_symlink():
                path.write_text("")

    def _build_pause(self, image: BuiltImage, dockerfile: Path) -> None:
        module = self._kubernetes_module_dir()
        source = module / PAUSE_SOURCE
        if not source.is_file():
            raise ImageError(f"{KUBERNETES_MODULE}@{self.kubernetes_version} has no {source}")
        tag = pause_tag(_read_text_or_empty(module / PAUSE_MAKEFILE)) or "unknown"
        with tempfile.TemporaryDirectory(prefix=".pause-", dir=self.archive_dir) as tmp:
            context = Path(tmp)
            shutil.copyfile(source, context / "pause.c")
            self._run(
                [
                    "gcc",
                    *PAUSE_CFLAGS,
                    f"-DVERSION=v{tag}-{self.kubernetes_version}",
                    "-o",
                    "pause",
                    "pause.c",
                ],
                "gcc -static pause.c (needs libc6-dev)",
                cwd=context,
            )
            (context / "pause.c").unlink()
            self._run(
                build_command("podman", image.reference, dockerfile, context),
                f"podman build {image.name}",
            )

    def _kubernetes_module_dir(self) -> Path:
        module = f"{KUBERNETES_MODULE}@{self.kubernetes_version}"
        output = self._run(
            ["go", "mod", "download", "-json", module],
            f"go mod download {module}",
            cwd=toolchain_module(self.repo),
            merge_stderr=False,
        )
        try:
            return Path(json.loads(output)["Dir"])
        except (ValueError, KeyError) as error:
            raise ImageError(f"go mod download {module} printed no Dir: {output!r}") from error

    def _build_dockerfile(self, image: BuiltImage, spec: ImageSpec) -> None:
        """Build from a context holding exactly the files the key covers."""
        dockerfile = self.repo / str(spec.dockerfile)
        declared = declared_args(dockerfile.read_text())
        build_args = {}
        if spec.base is not None:
            if "BASE" not in declared:
                raise ImageError(f"{spec.dockerfile} declares no ARG BASE")
            build_args["BASE"] = self.image(spec.base).reference
        secrets = {}
        if (bundle := host_ca_bundle(os.environ)) is not None:
            secrets[CA_SECRET] = bundle
        with tempfile.TemporaryDirectory(prefix=f".{image.name}-", dir=self.archive_dir) as tmp:
            context = Path(tmp)
            for name in context_files(self.repo, spec.copies):
                target = context / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.repo / name, target)
            self._run(
                build_command("podman", image.reference, dockerfile, context, build_args, secrets),
                f"podman build {image.name}",
            )

    def _ensure_in_store(self, image: BuiltImage) -> None:
        """A base image must be in podman's store to build FROM it; load it from its archive."""
        exists = subprocess.run(
            ["podman", "image", "exists", image.reference], capture_output=True, check=False
        )
        if exists.returncode == 0:
            return
        if not image.archive.is_file():
            raise ImageError(f"{image.reference} is neither in podman's store nor in the cache")
        self._run(["podman", "load", "--input", str(image.archive)], f"podman load {image.name}")
        exists = subprocess.run(
            ["podman", "image", "exists", image.reference], capture_output=True, check=False
        )
        if exists.returncode != 0:
            raise ImageError(f"podman load {image.archive} did not restore {image.reference}")

    def _save(self, image: BuiltImage) -> None:
        """Save as an OCI archive, into a temporary file renamed once complete."""
        partial = self.archive_dir / f".{image.archive.stem}.{os.getpid()}.partial"
        partial.unlink(missing_ok=True)  # podman refuses to overwrite
        try:
            self._run(
                [
                    *("podman", "save", "--format", "oci-archive"),
                    *("--output", str(partial), image.reference),
                ],
                f"podman save {image.name}",
            )
            partial.rename(image.archive)
        finally:
            partial.unlink(missing_ok=True)

    def _prune(self, image: BuiltImage) -> None:
        """Drop this image's archives and podman tags under other keys: they are stale."""
        for old in self.archive_dir.glob(f"{image.name}-*.tar"):
            key = old.name.removeprefix(f"{image.name}-").removesuffix(".tar")
            if key != image.key and re.fullmatch(f"[0-9a-f]{{{KEY_LENGTH}}}", key):
                old.unlink(missing_ok=True)
                self._say(f"removed the stale archive {old.name}")
        listed = subprocess.run(
            ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", image.repository],
            capture_output=True,
            text=True,
            check=False,
        )
        stale = [ref for ref in listed.stdout.split() if ref != image.reference]
        if stale:
            # A stale base may still be the parent of other images: then it stays.
            subprocess.run(["podman", "rmi", *stale], capture_output=True, check=False)

    # -- containerd ------------------------------------------------------------------------

    def import_into(self, images: Iterable[BuiltImage], ctr: Path | str, address: Path) -> None:
        """Import the images containerd's CRI namespace lacks, each named as its reference."""
        ctr = str(ctr)
        if shutil.which(ctr) is None:
            raise ImageError(missing_tool_message("ctr"))
        wanted = list(images)
        present = self._ctr_images(ctr, address)
        for image in wanted:
            if image.reference in present:
                self._say(f"{image.reference} is already in containerd")
                continue
            if not image.archive.is_file():
                raise ImageError(f"{image.archive} is missing; build it first (make images)")
            self._run(ctr_import_command(ctr, address, image), f"ctr import {image.name}")
        present = self._ctr_images(ctr, address)
        missing = [image.reference for image in wanted if image.reference not in present]
        if missing:
            raise ImageError(f"containerd has no {', '.join(missing)} after ctr images import")

    def _ctr_images(self, ctr: str, address: Path) -> set[str]:
        output = self._run(
            [
                *(ctr, "--address", str(address), "--namespace", CONTAINERD_NAMESPACE),
                *("images", "list", "--quiet"),
            ],
            "ctr images list",
            quiet=True,
            merge_stderr=False,
        )
        return set(output.split())

    # -- helpers ---------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        print(f"[images] {message}", file=self.out, flush=True)

    def _require(self, command: str) -> None:
        if shutil.which(command) is None:
            raise ImageError(missing_tool_message(command))

    def _run(
        self,
        args: Sequence[str],
        what: str,
        *,
        cwd: Path | None = None,
        stdin: IO[bytes] | None = None,
        quiet: bool = False,
        merge_stderr: bool = True,
    ) -> str:
        """Run one command, with a heartbeat while it works and its time when done."""
        if not quiet:
            self._say(f"{what} ...")
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                list(args),
                cwd=cwd,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                text=True,
                errors="replace",
            )
        except FileNotFoundError as error:
            raise ImageError(missing_tool_message(args[0])) from error
        with proc:
            while True:
                try:
                    output, errors = proc.communicate(timeout=HEARTBEAT_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = format_duration(time.monotonic() - started)
                    self._say(f"  still {what}: {elapsed}")
        elapsed = format_duration(time.monotonic() - started)
        if proc.returncode != 0:
            tail = "\n".join(f"{output}\n{errors or ''}".strip().splitlines()[-40:])
            raise ImageError(f"{what} failed after {elapsed}:\n{tail}")
        if not quiet:
            self._say(f"  {what}: {elapsed}")
        return output


def _read_text_or_empty(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def main_images(out: TextIO = sys.stderr, names: Sequence[str] = ALL) -> int:
    """``python -m localcluster images`` (``make images``): build what the cache lacks."""
    repo = Path(__file__).resolve().parents[2]
    try:
        images = Images(repo, default_cache_root(os.environ), kubernetes_version(repo), out)
        built = images.ensure_built(names)
    except (ImageError, ToolchainError) as error:
        print(f"error: {error}", file=out)
        return 1
    for image in built.values():
        print(f"{image.reference}  {_megabytes(image.archive)}  {image.archive}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main_images())
