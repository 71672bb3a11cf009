"""Model archives: a Triton model folder with a manifest, stored as an OCI artifact.

``modeldeploy-runtime package`` (the counterpart of MXNet Model Server's model archiver) turns a
Triton model folder into an archive: the folder's files plus ``modeldeploy.json``, the
manifest (name, version, format, inputs and outputs read from the Triton config, the config
itself, framework and training references, evaluation metrics, the drift reference profile
and every file's sha256). It pushes the archive to an OCI registry as an artifact, one layer
per file titled by its path (the layout ``oras push`` makes for files, so ``oras pull`` unpacks
ours, and ``oras push``-ed files and folders are fetched too), with the manifest as the config
blob; or it writes the folder for ``s3://``, ``gs://`` and ``https://`` stores.

The fetcher pulls ``oci://registry/repository:tag`` or ``...@sha256:<hex>`` through oras-py (the
ORAS project's client: registry auth, token exchange, retries), streams each layer to disk a
chunk at a time with its sha256 computed on the way, verifies every digest (the manifest's
against an ``@sha256:`` reference, each layer's against the manifest), resumes a layer a killed
fetch left half-written, and keeps layers in the node-local :class:`BlobCache` so a second
replica, a restart or a rollback on the same node skips the download.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from modeldeploy_runtime.streams import write_chunks

ARCHIVE_MANIFEST = "modeldeploy.json"
ARTIFACT_TYPE = "application/vnd.modeldeploy.model.v1"
CONFIG_MEDIA_TYPE = "application/vnd.modeldeploy.model.config.v1+json"
FILE_MEDIA_TYPE = "application/vnd.modeldeploy.model.file.v1"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TITLE = "org.opencontainers.image.title"
CHUNK_BYTES = 1024 * 1024  # see fetch.CHUNK_BYTES: larger chunks are slower, not faster
SCHEMA_VERSION = 1


class ArchiveError(RuntimeError):
    """The archive could not be made, pushed or pulled; the message says why."""


# -- the manifest -----------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def triton_config(text: str) -> Any:
    """config.pbtxt parsed with Triton's own protobuf schema (from tritonclient)."""
    from google.protobuf import text_format  # noqa: PLC0415
    from tritonclient.grpc import model_config_pb2  # noqa: PLC0415

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise ArchiveError(f"config.pbtxt does not parse: {error}") from error


def served_config(text: str, name: str, version: str | None = None) -> str:
    """config.pbtxt with ``name`` set (Triton wants the folder's name) and, given a
    ``version``, a version policy of that version only (the archive's folder is renamed)."""
    from google.protobuf import text_format  # noqa: PLC0415

    config = triton_config(text)
    changed = config.name not in ("", name)
    config.name = name
    if version is not None and config.HasField("version_policy"):
        wanted = [int(version)]
        if list(config.version_policy.specific.versions) != wanted:
            config.version_policy.specific.ClearField("versions")
            config.version_policy.specific.versions.extend(wanted)
            changed = True
    return str(text_format.MessageToString(config)) if changed else text


def tensors(config: Any, kind: str) -> list[dict[str, Any]]:
    from tritonclient.grpc import model_config_pb2  # noqa: PLC0415

    return [
        {
            "name": t.name,
            "dataType": model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_"),
            "dims": list(t.dims),
        }
        for t in getattr(config, kind)
    ]


def model_versions(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=int)


@dataclass(frozen=True)
class Metadata:
    """What ``package`` records beside the files."""

    name: str
    version: str
    format: str
    framework: Mapping[str, str] = field(default_factory=dict)
    training: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    reference_profile: Mapping[str, Any] | None = None


def package(source: Path, output: Path, metadata: Metadata) -> dict[str, Any]:
    """The Triton model folder ``source`` written as an archive folder ``output``: config.pbtxt,
    one version folder (``metadata.version``) and ``modeldeploy.json``. Returns the manifest."""
    config_file = source / "config.pbtxt"
    if not config_file.is_file():
        raise ArchiveError(f"{source} is not a Triton model folder: it has no config.pbtxt")
    versions = model_versions(source)
    if not metadata.version.isdigit():
        raise ArchiveError(f"--version must be a Triton version number, not {metadata.version}")
    if metadata.version not in versions:
        found = ", ".join(versions) or "none"
        raise ArchiveError(f"{source} has no version folder {metadata.version} (found: {found})")
    text = served_config(config_file.read_text(), metadata.name, metadata.version)
    config = triton_config(text)
    if output.exists():
        raise ArchiveError(f"{output} exists; choose a new output folder")
    shutil.copytree(source / metadata.version, output / metadata.version)
    (output / "config.pbtxt").write_text(text)
    files = {
        p.relative_to(output).as_posix(): file_sha256(p)
        for p in sorted(output.rglob("*"))
        if p.is_file()
    }
    manifest: dict[str, Any] = {
        "schemaVersion": SCHEMA_VERSION,
        "name": metadata.name,
        "version": metadata.version,
        "format": metadata.format,
        "platform": config.platform or config.backend,
        "maxBatchSize": config.max_batch_size,
        "inputs": tensors(config, "input"),
        "outputs": tensors(config, "output"),
        "tritonConfig": text,
        "framework": dict(metadata.framework),
        "training": dict(metadata.training),
        "metrics": dict(metadata.metrics),
        "referenceProfile": metadata.reference_profile,
        "files": files,
    }
    (output / ARCHIVE_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# -- references -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """``oci://registry/repository[:tag][@sha256:<hex>]``."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, uri: str) -> Reference:
        rest = uri.removeprefix("oci://")
        name, _, digest = rest.partition("@")
        registry, slash, path = name.partition("/")
        if (
            not slash
            or not path
            or ("." not in registry and ":" not in registry and registry != "localhost")
        ):
            raise ArchiveError(
                f"{uri}: expected oci://<registry host>/<repository>[:tag][@sha256:<hex>]"
            )
        repository, colon, tag = path.rpartition(":")
        if not colon or "/" in tag:
            repository, tag = path, ""
        if digest and (not digest.startswith("sha256:") or len(digest) != 71):
            raise ArchiveError(f"{uri}: a digest is sha256:<64 hex digits>")
        if not tag and not digest:
            tag = "latest"
        return cls(registry, repository, tag or None, digest or None)

    @property
    def target(self) -> str:
        """What oras-py's container parser takes: ``registry/repository:tag`` or ``@digest``."""
        suffix = f"@{self.digest}" if self.digest else f":{self.tag}"
        return f"{self.registry}/{self.repository}{suffix}"

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        at = f"@{self.digest}" if self.digest else ""
        return f"oci://{self.registry}/{self.repository}{tag}{at}"


def registry_client(
    reference: Reference, credentials: Mapping[str, str], *, plain_http: bool, config_dir: Path
) -> Any:
    """An oras-py client for the reference's registry: basic credentials (``username`` and
    ``password``) or a Docker config (``.dockerconfigjson``, an image pull Secret's key)."""
    import oras.provider  # noqa: PLC0415 - only archives need it

    client = oras.provider.Registry(hostname=reference.registry, insecure=plain_http)
    if credentials.get("username") and credentials.get("password"):
        client.auth.set_basic_auth(credentials["username"], credentials["password"])
    elif ".dockerconfigjson" in credentials:
        config = config_dir / "config.json"
        config.write_text(credentials[".dockerconfigjson"])
        client.auth.load_configs(client.get_container(reference.target), configs=[str(config)])
    return client


def push(
    folder: Path,
    reference: Reference,
    credentials: Mapping[str, str],
    *,
    plain_http: bool = False,
    config_dir: Path,
) -> str:
    """The archive folder pushed as an OCI artifact; the manifest's digest."""
    import oras.oci  # noqa: PLC0415

    manifest_file = folder / ARCHIVE_MANIFEST
    if not manifest_file.is_file():
        raise ArchiveError(f"{folder} is not an archive: it has no {ARCHIVE_MANIFEST}")
    meta = json.loads(manifest_file.read_text())
    client = registry_client(reference, credentials, plain_http=plain_http, config_dir=config_dir)
    container = client.get_container(reference.target)
    layers = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p != manifest_file):
        layer = oras.oci.NewLayer(str(path), media_type=FILE_MEDIA_TYPE)
        layer["annotations"] = {TITLE: path.relative_to(folder).as_posix()}
        checked(client.upload_blob(str(path), container, layer, do_chunked=True), "a layer")
        layers.append(layer)
    config = oras.oci.NewLayer(str(manifest_file), media_type=CONFIG_MEDIA_TYPE)
    checked(client.upload_blob(str(manifest_file), container, config), "the manifest")
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": config,
        "layers": layers,
        "annotations": {
            "io.modeldeploy.model.name": str(meta.get("name", "")),
            "io.modeldeploy.model.version": str(meta.get("version", "")),
        },
    }
    body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    url = f"{client.prefix}://{container.manifest_url()}"
    response = client.do_request(url, "PUT", headers={"Content-Type": OCI_MANIFEST}, data=body)
    checked(response, "the OCI manifest")
    return "sha256:" + hashlib.sha256(body).hexdigest()


def checked(response: Any, what: str) -> Any:
    if response.status_code not in (200, 201, 202):
        raise ArchiveError(f"the registry refused {what}: HTTP {response.status_code}")
    return response


# -- the node-local cache ---------------------------------------------------------------------


class BlobCache:
    """Layers by digest on the node (a hostPath): ``blobs/sha256/<hex>``, written through
    ``tmp/`` and renamed when verified, so a reader never sees half a blob; one lock file per
    digest, so two pods fetching the same layer download it once. Files reach a model
    repository as hard links (copies across file systems), so evicting a blob never takes it
    from a running model. Least recently used blobs go first once ``max_bytes`` is passed."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        for sub in ("blobs/sha256", "tmp", "locks"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def partial(self, digest: str) -> Path:
        return self.root / "tmp" / f"{digest.removeprefix('sha256:')}.partial"

    @contextlib.contextmanager
    def lock(self, digest: str, *, wait: bool = True) -> Iterator[bool]:
        """The digest's lock, held for the block; without ``wait``, yields False at once
        when another fetch holds it."""
        with (self.root / "locks" / digest.removeprefix("sha256:")).open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def evict(self, keep: set[str]) -> int:
        """Least recently used blobs removed until the cache fits; the bytes freed. Blobs in
        ``keep`` (this fetch's) stay, and blobs no model links to go before linked ones."""
        blobs = [p for p in (self.root / "blobs" / "sha256").iterdir() if p.is_file()]
        stats = {p: p.stat() for p in blobs}
        total = sum(s.st_size for s in stats.values())
        freed = 0
        order = sorted(blobs, key=lambda p: (stats[p].st_nlink > 1, stats[p].st_mtime))
        for blob in order:
            if total - freed <= self.max_bytes:
                break
            digest = f"sha256:{blob.name}"
            if digest in keep:
                continue
            with self.lock(digest, wait=False) as held:
                if not held:  # another fetch is downloading or linking it: not now
                    continue
                blob.unlink(missing_ok=True)
            freed += stats[blob].st_size
        return freed


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system (EXDEV), or links not allowed
        shutil.copyfile(source, target)


# -- pulling ----------------------------------------------------------------------------------


@dataclass
class Pulled:
    digest: str  # the OCI manifest's
    metadata: dict[str, Any] | None  # the archive's manifest (None: a plain ORAS artifact)
    downloaded_bytes: int = 0
    cached_layers: int = 0
    layers: int = 0


ORAS_FOLDER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
ORAS_UNPACK = "io.deis.oras.content.unpack"


def is_folder(layer: Mapping[str, Any]) -> bool:
    """A folder ``oras push`` tarred (its media type, or ORAS's unpack annotation)."""
    annotations = layer.get("annotations") or {}
    return bool(
        layer.get("mediaType") == ORAS_FOLDER_MEDIA_TYPE or annotations.get(ORAS_UNPACK) == "true"
    )


def unpack_folder(tarball: Path, staging: Path) -> None:
    """The tarball's members under ``staging`` (the tar names the folder itself), refusing
    links and paths that leave it (the ``data`` filter), then the tarball goes."""
    with tarfile.open(tarball) as bundle:
        bundle.extractall(staging, filter="data")
    tarball.unlink()


def safe_path(root: Path, relative: str) -> Path:
    path = PurePosixPath(relative)
    if not relative or path.is_absolute() or ".." in path.parts:
        raise ArchiveError(f"refusing a layer titled {relative!r}: not a path inside the model")
    return root.joinpath(*path.parts)


class Puller:
    """Pulls one reference into a staging folder (see the module's docstring)."""

    def __init__(
        self,
        reference: Reference,
        credentials: Mapping[str, str],
        *,
        plain_http: bool,
        config_dir: Path,
        cache: BlobCache | None,
    ) -> None:
        self.reference = reference
        self.client = registry_client(
            reference, credentials, plain_http=plain_http, config_dir=config_dir
        )
        self.container = self.client.get_container(reference.target)
        self.cache = cache

    def manifest(self) -> tuple[dict[str, Any], str]:
        url = f"{self.client.prefix}://{self.container.manifest_url()}"
        response = self.client.do_request(url, "GET", headers={"Accept": OCI_MANIFEST})
        if response.status_code == 404:
            raise ArchiveError(f"{self.reference}: not found in the registry")
        if response.status_code in (401, 403):
            raise ArchiveError(
                f"{self.reference}: the registry refused the credentials (HTTP"
                f" {response.status_code})"
            )
        checked(response, "to give the manifest")
        body: bytes = response.content
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if self.reference.digest and digest != self.reference.digest:
            raise ArchiveError(
                f"{self.reference}: the registry answered a manifest whose digest is {digest}"
            )
        manifest: dict[str, Any] = json.loads(body)
        if manifest.get("mediaType", OCI_MANIFEST) != OCI_MANIFEST:
            raise ArchiveError(
                f"{self.reference}: {manifest.get('mediaType')} is not an OCI artifact manifest"
                " (an image index or a Docker image?)"
            )
        return manifest, digest

    def pull(self, staging: Path) -> Pulled:
        manifest, digest = self.manifest()
        config = manifest.get("config") or {}
        layers = manifest.get("layers") or []
        untitled = [layer for layer in layers if TITLE not in (layer.get("annotations") or {})]
        if untitled or not layers:
            raise ArchiveError(
                f"{self.reference}: not a model archive: layers without a file title (a"
                " container image?); make one with modeldeploy-runtime package"
            )
        pulled = Pulled(digest=digest, metadata=None, layers=len(layers))
        if config.get("mediaType") == CONFIG_MEDIA_TYPE:
            target = staging / ARCHIVE_MANIFEST
            pulled.downloaded_bytes += self.blob(config, target)[0]
            pulled.metadata = json.loads(target.read_text())
        for layer in layers:
            target = safe_path(staging, layer["annotations"][TITLE])
            folder = is_folder(layer)
            if folder:  # ORAS tars a pushed folder: fetch the tarball beside, then unpack
                target = target.with_name(f".{target.name}.tar.gz")
            downloaded, hit = self.blob(layer, target)
            pulled.downloaded_bytes += downloaded
            pulled.cached_layers += hit
            if folder:
                unpack_folder(target, staging)
        entries = [e for e in staging.iterdir() if not e.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir() and pulled.metadata is None:
            # One pushed folder (``oras push reg/iris:1 ./iris``): its contents are the model.
            for entry in list(entries[0].iterdir()):
                entry.rename(staging / entry.name)
            entries[0].rmdir()
        if self.cache is not None:
            self.cache.evict({blob.get("digest") for blob in [*layers, config]})
        return pulled

    def blob(self, descriptor: Mapping[str, Any], target: Path) -> tuple[int, bool]:
        """One blob to ``target``, from the cache or the registry: the bytes downloaded, and
        whether the cache held it."""
        digest = str(descriptor.get("digest", ""))
        if not digest.startswith("sha256:"):
            raise ArchiveError(f"{self.reference}: unsupported digest {digest!r}")
        if self.cache is None:
            partial = target.with_name(f".{target.name}.partial")
            return self.download(descriptor, partial, target), False
        with self.cache.lock(digest):
            cached = self.cache.path(digest)
            hit = cached.is_file()
            downloaded = 0
            if hit:
                os.utime(cached)  # recently used
            else:
                downloaded = self.download(descriptor, self.cache.partial(digest), cached)
            link_or_copy(cached, target)
            return downloaded, hit

    def download(self, descriptor: Mapping[str, Any], partial: Path, target: Path) -> int:
        """Streamed into ``partial`` (continued from its end when a killed fetch left one),
        hashed on the way, renamed to ``target`` once its digest and size are right."""
        digest, size = str(descriptor["digest"]), int(descriptor.get("size", -1))
        partial.parent.mkdir(parents=True, exist_ok=True)
        hasher = hashlib.sha256()
        offset = partial.stat().st_size if partial.is_file() else 0
        if offset and 0 <= offset < size:
            with partial.open("rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    hasher.update(chunk)
        else:
            offset = 0
        url = f"{self.client.prefix}://{self.container.get_blob_url(digest)}"
        # A closed range: some registries (go-containerregistry's) refuse ``bytes=N-``.
        ranged = {"Range": f"bytes={offset}-{size - 1}"} if offset else {}
        headers = {**self.client.headers, **ranged}
        with self.client.do_request(url, "GET", headers=headers, stream=True) as response:
            if offset and response.status_code == 200:  # no ranges: start over
                offset, hasher = 0, hashlib.sha256()
            elif response.status_code not in (200, 206):
                raise ArchiveError(
                    f"{self.reference}: the registry answered HTTP {response.status_code}"
                    f" for layer {descriptor.get('annotations', {}).get(TITLE, digest)}"
                )
            with partial.open("ab" if offset else "wb") as out:
                downloaded = write_chunks(response.iter_content(CHUNK_BYTES), out, hasher)
        found = "sha256:" + hasher.hexdigest()
        if found != digest or (size >= 0 and partial.stat().st_size != size):
            partial.unlink(missing_ok=True)
            title = (descriptor.get("annotations") or {}).get(TITLE, "the archive's manifest")
            raise ArchiveError(
                f"{self.reference}: {title} is corrupted: its digest is {found}, the manifest"
                f" says {digest}"
            )
        partial.replace(target)
        return downloaded
