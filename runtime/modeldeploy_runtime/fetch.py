"""`modeldeploy-runtime fetch`: the init container that lays out Triton's model repository.

Sources, by ``spec.model.storageUri`` scheme:

- ``https://`` (and ``http://`` for tests): one file, or a .tar.gz/.tgz/.tar/.zip archive
  unpacked; a ``token`` credential becomes a Bearer header.
- ``pvc://<claim>/<path>``: the operator mounts the claim read-only at ``--pvc-root``; a file
  or a folder is copied.
- ``s3://<bucket>/<prefix>``: S3 (or any S3-compatible store) through obstore (the Rust
  ``object_store`` crate, which signs, lists, retries and streams), from the credentials
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``;
  anonymous without keys. The object named so, or every object under the folder ``prefix/``
  (``models/resnet`` never pulls ``models/resnet-old/``), streamed to disk a chunk at a time.
- ``gs://<bucket>/<prefix>``: Google Cloud Storage through its S3-compatible XML API
  (HMAC keys in the same credential names).
- ``hf://<org>/<repo>[@revision][/<path>]``: the Hugging Face Hub through huggingface_hub
  (``HF_TOKEN`` optional).
- ``oci://<registry>/<repository>[:tag][@sha256:<hex>]``: a model archive made by
  ``modeldeploy-runtime package`` (or any ``oras push``-ed folder), pulled through oras-py with
  every digest verified, layers kept in the node-local cache (``--cache-dir``); credentials
  ``username``/``password`` or ``.dockerconfigjson``. See :mod:`modeldeploy_runtime.archive`.

Credentials are files in ``--credentials-dir`` (a mounted Secret), never environment
variables, and are never logged.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from modeldeploy_runtime.archive import (
    ARCHIVE_MANIFEST,
    ArchiveError,
    BlobCache,
    Puller,
    Reference,
    served_config,
)
from modeldeploy_runtime.model_repository import default_file_name, render_config, version_dir
from modeldeploy_runtime.streams import write_chunks

ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")
# What a streamed download holds in memory at once. Measured (make bench-fetch): 8 MiB chunks
# cost three times the system time of 1 MiB ones (each is a fresh mmap whose pages fault in
# and are unmapped again), which made the fetcher half as fast as curl; 1 MiB matches it.
CHUNK_BYTES = 1024 * 1024

REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(RuntimeError):
    """The model could not be fetched; the message is what the pod's status will show."""


def shown(url: str) -> str:
    """A URL as messages show it: no query string (a presigned signature), no user info."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Http:
    """HTTP(S) downloads through urllib3, streamed. Redirects are followed here, not by the
    library, so that credentials never reach another origin (scheme, host and port) and an
    https URL is never followed to http."""

    def __init__(self, timeout: float = 300.0, max_redirects: int = 5) -> None:
        import urllib3  # noqa: PLC0415 - only the fetcher needs it

        self._pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=30.0, read=timeout),
            retries=urllib3.Retry(total=3, redirect=False, backoff_factor=0.5),
        )
        self._max_redirects = max_redirects

    def open(self, url: str, headers: Mapping[str, str] | None = None) -> Any:
        """The response to a GET, after redirects, with its body not yet read."""
        import urllib3  # noqa: PLC0415

        sent = dict(headers or {})
        for _ in range(self._max_redirects + 1):
            scheme = urllib.parse.urlsplit(url).scheme
            if scheme not in ("http", "https"):
                raise FetchError(f"refusing to fetch {shown(url)}: only http(s) URLs are fetched")
            try:
                response = self._pool.request(
                    "GET", url, headers=sent, redirect=False, preload_content=False
                )
            except urllib3.exceptions.HTTPError as error:
                raise FetchError(f"{shown(url)}: {error}") from error
            if response.status in REDIRECTS and response.headers.get("location"):
                target = urllib.parse.urljoin(url, response.headers["location"])
                response.release_conn()
                if scheme == "https" and urllib.parse.urlsplit(target).scheme != "https":
                    raise FetchError(f"{shown(url)}: refusing a redirect from https to http")
                if origin(target) != origin(url):
                    sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
                url = target
                continue
            if response.status not in (200, 206):
                response.release_conn()
                raise FetchError(f"{shown(url)}: HTTP {response.status} {response.reason}")
            return response
        raise FetchError(f"{shown(url)}: more than {self._max_redirects} redirects")

    def download(self, url: str, target: Path, headers: Mapping[str, str] | None = None) -> int:
        """Streamed to ``target`` through a .partial file renamed when whole; the bytes
        downloaded now. A .partial a killed fetch left is continued with ``Range`` and
        ``If-Range`` (its ETag or Last-Modified): a server that changed the file, or that
        ignores ranges, answers whole and the download starts over."""
        partial, tag = partial_of(target), target.with_name(f".{target.name}.validator")
        offset = partial.stat().st_size if partial.is_file() and tag.is_file() else 0
        sent = dict(headers or {})
        if offset:
            sent |= {"Range": f"bytes={offset}-", "If-Range": tag.read_text()}
        response = self.open(url, sent)
        try:
            if response.status == 206:
                if not response.headers.get("content-range", "").startswith(f"bytes {offset}-"):
                    raise FetchError(f"{shown(url)}: the server answered another range")
            else:
                offset = 0
            validator = response.headers.get("etag") or response.headers.get("last-modified")
            if validator and not validator.startswith("W/"):  # a weak ETag proves nothing
                target.parent.mkdir(parents=True, exist_ok=True)
                tag.write_text(validator)
            size = write_streamed(response.stream(CHUNK_BYTES), target, append=bool(offset))
            tag.unlink(missing_ok=True)
            return size
        except OSError as error:
            raise FetchError(f"{shown(url)}: {error}") from error
        finally:
            response.release_conn()


def partial_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def write_streamed(chunks: Iterable[bytes], target: Path, *, append: bool = False) -> int:
    """``chunks`` into ``target``'s ``.partial`` file (after what it holds, when
    ``append``), renamed to ``target`` when whole; the bytes written now."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_of(target)
    with partial.open("ab" if append else "wb") as out:
        size = write_chunks(chunks, out)
    partial.rename(target)
    return size


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def read_credentials(directory: Path | None) -> dict[str, str]:
    if directory is None or not directory.is_dir():
        return {}
    return {p.name: p.read_text().strip() for p in directory.iterdir() if p.is_file()}


# -- object stores ----------------------------------------------------------------------------


def object_store(scheme: str, bucket: str, credentials: Mapping[str, str]) -> Any:
    """An obstore S3 client for ``s3://`` (or any S3-compatible endpoint) and ``gs://``
    (Cloud Storage's S3-compatible XML API, with HMAC keys): anonymous without keys."""
    from obstore.store import S3Store  # noqa: PLC0415 - only the fetcher needs it

    region = credentials.get("AWS_REGION", "auto" if scheme == "gs" else "us-east-1")
    default = "https://storage.googleapis.com" if scheme == "gs" else None
    endpoint = credentials.get("AWS_ENDPOINT_URL") or default
    options: dict[str, Any] = {"region": region}
    if endpoint:
        options["endpoint"] = endpoint.rstrip("/")
        options["virtual_hosted_style_request"] = False
        options["client_options"] = {"allow_http": endpoint.startswith("http://")}
    if credentials.get("AWS_ACCESS_KEY_ID") and credentials.get("AWS_SECRET_ACCESS_KEY"):
        options["access_key_id"] = credentials["AWS_ACCESS_KEY_ID"]
        options["secret_access_key"] = credentials["AWS_SECRET_ACCESS_KEY"]
    else:
        options["skip_signature"] = True
    return S3Store(bucket, **options)


def stream_to(store: Any, key: str, target: Path) -> int:
    """One object streamed to ``target`` through a ``.partial`` file beside it, renamed when
    whole: memory stays at one chunk whatever the object's size. A ``.partial`` left by a
    killed fetch is resumed from its end, if the object is still the one it began (same
    ETag); otherwise it starts over. Returns the bytes downloaded now."""
    import obstore  # noqa: PLC0415

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_of(target)
    tag = target.with_name(f".{target.name}.etag")
    offset = partial.stat().st_size if partial.is_file() and tag.is_file() else 0
    result = None
    if offset:
        began = tag.read_text()
        try:
            options = {"range": {"offset": offset}, "if_match": began}
            result = obstore.get(store, key, options=options)  # type: ignore[arg-type]
        except Exception:  # changed since (412), already whole (416), ...: start over
            offset = 0
        else:
            if result.meta.get("e_tag") != began:  # a store that ignored If-Match
                result, offset = None, 0
    if result is None:
        result = obstore.get(store, key)
    if etag := result.meta.get("e_tag"):
        tag.write_text(etag)
    # Chunks as they arrive: gathering them (min_chunk_size) costs a copy, and measured slower.
    size = write_streamed(result.stream(min_chunk_size=0), target, append=bool(offset))
    tag.unlink(missing_ok=True)
    return size


def fetch_object_store(
    scheme: str, rest: str, staging: Path, credentials: Mapping[str, str], single_name: str
) -> int:
    """``<bucket>/<prefix>``: the object named so (as ``single_name``), else every object
    under the folder ``prefix/`` (never ``prefix-old/``), each streamed to disk."""
    import obstore  # noqa: PLC0415
    from obstore.exceptions import BaseError  # noqa: PLC0415

    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    store = object_store(scheme, bucket, credentials)
    try:
        if prefix:
            try:
                obstore.head(store, prefix)
            except FileNotFoundError:  # obstore's not-found is this one
                pass
            else:
                return stream_to(store, prefix, staging / single_name)
        keys = [
            item["path"]
            for batch in obstore.list(store, prefix=prefix or None)
            for item in batch
            if not item["path"].endswith("/")
        ]
        if not keys:
            raise FetchError(f"{scheme}://{rest}: no objects under {prefix or 'the bucket'}/")
        return sum(
            stream_to(store, key, safe_join(staging, key[len(prefix) :].lstrip("/")))
            for key in keys
        )
    except (BaseError, OSError) as error:
        raise FetchError(f"{scheme}://{rest}: {first_line(error)}") from error


def first_line(error: BaseException) -> str:
    """An error's first line, with any URL's query string (a presigned signature) removed."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"(https?://[^\s?]+)\?\S*", r"\1?...", text)[:500]


# -- sources ----------------------------------------------------------------------------------


def safe_join(root: Path, relative: str) -> Path:
    """``root / relative``, refusing paths that would escape ``root``."""
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts:
        raise FetchError(f"refusing a path outside the repository: {relative}")
    return root.joinpath(*path.parts)


def unpack(archive: Path, staging: Path) -> None:
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as bundle:
            for name in bundle.namelist():
                safe_join(staging, name)
            bundle.extractall(staging)  # noqa: S202 - every member checked above
        return
    with tarfile.open(archive) as bundle:
        bundle.extractall(staging, filter="data")


def fetch_https(
    uri: str, staging: Path, credentials: Mapping[str, str], http: Http, single_name: str
) -> int:
    """The file, or the archive unpacked; the bytes downloaded now."""
    headers = {"Authorization": f"Bearer {credentials['token']}"} if "token" in credentials else {}
    path = urllib.parse.urlsplit(uri).path
    if not path.endswith(ARCHIVES):
        return http.download(uri, staging / single_name, headers)
    # In the staging folder (the same volume, not the container's small /tmp), under a fixed
    # name, so a restarted fetch resumes the archive; gone once unpacked.
    download = staging / ".download"
    archive = download / PurePosixPath(path).name
    size = http.download(uri, archive, headers)
    unpack(archive, staging)
    shutil.rmtree(download)
    return size


def fetch_pvc(rest: str, staging: Path, pvc_root: Path, single_name: str) -> None:
    _claim, _, path = rest.partition("/")
    source = safe_join(pvc_root, path) if path else pvc_root
    if source.is_dir():
        shutil.copytree(source, staging, dirs_exist_ok=True)
    elif source.is_file():
        shutil.copy2(source, staging / single_name)
    else:
        raise FetchError(f"pvc://{rest}: {path or '/'} does not exist on the claim")


def fetch_hf(rest: str, staging: Path, credentials: Mapping[str, str], endpoint: str) -> None:
    """``<org>/<repo>[@revision][/<path>]`` through huggingface_hub (the Hub's own client:
    listing, parallel downloads, resumable ``.incomplete`` files, Xet storage, redirects to the
    CDN without the token). The download folder lives in the staging folder, so a restarted
    fetch resumes it."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415 - only hf:// needs it
    from huggingface_hub.errors import HfHubHTTPError  # noqa: PLC0415
    from huggingface_hub.utils.tqdm import disable_progress_bars  # noqa: PLC0415

    parts = rest.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise FetchError(f"hf://{rest}: expected hf://<org>/<repo>[@revision][/path]")
    org, repo_rev = parts[0], parts[1]
    subpath = parts[2].strip("/") if len(parts) > 2 else ""
    repo, _, revision = repo_rev.partition("@")
    download = staging / ".hf"
    disable_progress_bars()
    try:
        snapshot_download(
            f"{org}/{repo}",
            revision=revision or None,
            local_dir=download,
            cache_dir=download / ".cache",
            allow_patterns=[f"{subpath}/**"] if subpath else None,
            token=credentials.get("HF_TOKEN") or False,
            endpoint=endpoint,
            max_workers=4,
        )
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise FetchError(f"hf://{rest}: {first_line(error)}") from error
    fetched = download / subpath if subpath else download
    files = [
        p
        for p in fetched.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(download).parts
    ]
    if not files:
        raise FetchError(f"hf://{rest}: no files")
    for file in files:
        moved = staging / file.relative_to(fetched)
        moved.parent.mkdir(parents=True, exist_ok=True)
        file.replace(moved)
    shutil.rmtree(download, ignore_errors=True)


@dataclass(frozen=True)
class Fetched:
    """What a fetch did, for its report (which the operator reads from the pod)."""

    downloaded_bytes: int | None = None  # None: not counted for this source
    digest: str | None = None  # an OCI archive's manifest digest
    archive: Mapping[str, Any] | None = None  # the archive's manifest, when there is one
    layers: int = 0
    cached_layers: int = 0  # layers the node-local cache already held


def fetch_oci(
    uri: str,
    staging: Path,
    credentials: Mapping[str, str],
    *,
    plain_http: bool,
    cache: BlobCache | None,
) -> Fetched:
    try:
        reference = Reference.parse(uri)
        with tempfile.TemporaryDirectory(dir=staging.parent, prefix=".oci-auth-") as config_dir:
            puller = Puller(
                reference,
                credentials,
                plain_http=plain_http,
                config_dir=Path(config_dir),
                cache=cache,
            )
            pulled = puller.pull(staging)
    except ArchiveError as error:
        raise FetchError(str(error)) from error
    except (OSError, ValueError) as error:  # requests' errors are OSErrors; bad JSON
        raise FetchError(f"{uri}: {first_line(error)}") from error
    return Fetched(
        downloaded_bytes=pulled.downloaded_bytes,
        digest=pulled.digest,
        archive=pulled.metadata,
        layers=pulled.layers,
        cached_layers=pulled.cached_layers,
    )


def fetch_to(  # noqa: PLR0913 - keyword-only options, one per source kind
    uri: str,
    staging: Path,
    *,
    model_format: str,
    credentials: Mapping[str, str],
    pvc_root: Path,
    http: Http | None = None,
    hf_endpoint: str = "https://huggingface.co",
    plain_http: bool = False,
    cache: BlobCache | None = None,
) -> Fetched:
    """Put the model's files (or its whole model folder) into ``staging``."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise FetchError(f"not a URI: {uri}")
    single = default_file_name(model_format)
    http = http or Http()
    if scheme in ("https", "http"):
        return Fetched(fetch_https(uri, staging, credentials, http, single))
    if scheme in ("s3", "gs"):
        return Fetched(fetch_object_store(scheme, rest, staging, credentials, single))
    if scheme == "oci":
        return fetch_oci(uri, staging, credentials, plain_http=plain_http, cache=cache)
    if scheme == "pvc":
        fetch_pvc(rest, staging, pvc_root, single)
    elif scheme == "hf":
        fetch_hf(rest, staging, credentials, hf_endpoint)
    else:
        raise FetchError(f"{scheme}:// is not supported by this fetcher")
    return Fetched()


def move_tree(source: Path, target: Path) -> None:
    """Every file of ``source`` moved under ``target`` (renames on one volume: a large model
    is never copied)."""
    for path in sorted(source.rglob("*")):
        if path.is_file():
            moved = target / path.relative_to(source)
            moved.parent.mkdir(parents=True, exist_ok=True)
            path.replace(moved)


def install(
    staging: Path,
    repository: Path,
    *,
    name: str,
    version: str,
    model_format: str,
    overrides: Mapping[str, Any],
) -> Path:
    """Lay the fetched files out as ``<repository>/<name>/<version>/...`` plus config.pbtxt.

    A fetched Triton model folder (config.pbtxt beside version folders) is used as it is,
    unless the spec overrides its configuration; anything else becomes the version folder.
    """
    model = repository / name
    model.mkdir(parents=True, exist_ok=True)
    if (staging / ARCHIVE_MANIFEST).is_file():
        archived = json.loads((staging / ARCHIVE_MANIFEST).read_text()).get("version")
        if archived and archived != version and (staging / str(archived)).is_dir():
            # The archive's version folder serves as the spec's version.
            (staging / str(archived)).rename(staging / version)
        config_file = staging / "config.pbtxt"
        if config_file.is_file():
            replace_text(config_file, served_config(config_file.read_text(), name, version))
    if (staging / "config.pbtxt").is_file() and (staging / version).is_dir():
        move_tree(staging, model)
    else:
        move_tree(staging, version_dir(repository, name, version))
    config = model / "config.pbtxt"
    if overrides or not config.exists():
        replace_text(config, render_config(name, model_format, version, overrides))
    return model


def replace_text(path: Path, text: str) -> None:
    """``path`` replaced by a new file (never written in place: it may be a hard link into
    the node-local cache)."""
    if path.is_file() and path.read_text() == text:
        return
    fresh = path.with_name(f".{path.name}.new")
    fresh.write_text(text)
    fresh.replace(path)


def content_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes; of a folder, of its manifest: one line per file,
    ``<relative path>\\0<sha256 hex>\\n``, sorted by path (files read in chunks)."""
    if path.is_file():
        with path.open("rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    manifest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with file.open("rb") as f:
            each = hashlib.file_digest(f, "sha256").hexdigest()
        manifest.update(f"{file.relative_to(path).as_posix()}\0{each}\n".encode())
    return "sha256:" + manifest.hexdigest()


def verify(staging: Path, expected: str, single_name: str) -> None:
    """The fetched content against ``spec.model.digest``; a FetchError that says both."""
    files = [p for p in staging.rglob("*") if p.is_file()]
    single = staging / single_name
    found = content_digest(single if files == [single] else staging)
    if found != expected:
        raise FetchError(
            f"digest mismatch: spec.model.digest is {expected}, the fetched content is {found}"
            " (changed or corrupted at the source)"
        )
