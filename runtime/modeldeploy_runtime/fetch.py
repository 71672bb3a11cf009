"""`modeldeploy-runtime fetch`: the init container that lays out Triton's model repository.

Sources, by ``spec.model.storageUri`` scheme:

- ``https://`` (and ``http://`` for tests): one file, or a .tar.gz/.tgz/.tar/.zip archive
  unpacked; a ``token`` credential becomes a Bearer header.
- ``pvc://<claim>/<path>``: the operator mounts the claim read-only at ``--pvc-root``; a file
  or a folder is copied.
- ``s3://<bucket>/<prefix>``: S3 (or any S3-compatible store) with Signature V4, from the
  credentials ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
  ``AWS_ENDPOINT_URL``; anonymous without keys.
- ``gs://<bucket>/<prefix>``: Google Cloud Storage through its S3-compatible XML API
  (HMAC keys in the same credential names).
- ``hf://<org>/<repo>[@revision][/<path>]``: the Hugging Face Hub (``HF_TOKEN`` optional).
- ``oci://``: not supported yet; the fetch fails with a message that says so.

Credentials are files in ``--credentials-dir`` (a mounted Secret), never environment
variables, and are never logged. The stdlib only: the fetcher runs in every pod.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from modeldeploy_runtime.model_repository import default_file_name, render_config, version_dir

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"

Fetcher = Callable[[urllib.request.Request], bytes]


class FetchError(RuntimeError):
    """The model could not be fetched; the message is what the pod's status will show."""


def make_request(url: str, headers: Mapping[str, str] | None = None) -> urllib.request.Request:
    """An HTTP(S) request; any other scheme (file:, ftp:) is refused."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise FetchError(f"refusing to fetch {url}: only http(s) URLs are fetched")
    return urllib.request.Request(url, headers=dict(headers or {}))  # noqa: S310 - checked above


def http_get(request: urllib.request.Request) -> bytes:
    try:
        with urllib.request.urlopen(request, timeout=300) as response:  # noqa: S310 - schemes checked
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as error:
        raise FetchError(f"{request.full_url}: HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        raise FetchError(f"{request.full_url}: {error.reason}") from error


def read_credentials(directory: Path | None) -> dict[str, str]:
    if directory is None or not directory.is_dir():
        return {}
    return {p.name: p.read_text().strip() for p in directory.iterdir() if p.is_file()}


# -- AWS Signature Version 4 ------------------------------------------------------------------


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class SigningKey:
    access_key: str
    secret_key: str
    region: str
    service: str = "s3"


def sign_v4(
    method: str,
    url: str,
    headers: Mapping[str, str],
    key: SigningKey,
    now: dt.datetime,
    payload_sha256: str = EMPTY_SHA256,
) -> dict[str, str]:
    """Headers that sign a request with AWS Signature Version 4."""
    access_key, secret_key, region, service = (
        key.access_key,
        key.secret_key,
        key.region,
        key.service,
    )
    parts = urllib.parse.urlsplit(url)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    day = stamp[:8]
    signed = {k.lower(): v.strip() for k, v in headers.items()}
    signed |= {"host": parts.netloc, "x-amz-date": stamp, "x-amz-content-sha256": payload_sha256}
    names = sorted(signed)
    query = sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    canonical = "\n".join(
        [
            method,
            urllib.parse.quote(parts.path or "/", safe="/-_.~"),
            "&".join(
                f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                for k, v in query
            ),
            "".join(f"{name}:{signed[name]}\n" for name in names),
            ";".join(names),
            payload_sha256,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    signing = _hmac(
        _hmac(_hmac(_hmac(f"AWS4{secret_key}".encode(), day), region), service), "aws4_request"
    )
    signature = hmac.new(signing, to_sign.encode(), hashlib.sha256).hexdigest()
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope},"
        f"SignedHeaders={';'.join(names)},Signature={signature}"
    )
    return {
        "x-amz-date": stamp,
        "x-amz-content-sha256": payload_sha256,
        "Authorization": authorization,
    }


@dataclass(frozen=True)
class ObjectStore:
    """An S3-compatible endpoint, path-style: ``<endpoint>/<bucket>/<key>``."""

    endpoint: str
    region: str
    access_key: str | None
    secret_key: str | None
    get: Fetcher
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)

    def request(self, url: str) -> bytes:
        headers: dict[str, str] = {}
        if self.access_key and self.secret_key:
            key = SigningKey(self.access_key, self.secret_key, self.region)
            headers = sign_v4("GET", url, {}, key, self.clock())
        return self.get(make_request(url, headers=headers))

    def list_keys(self, bucket: str, prefix: str) -> list[str]:
        keys: list[str] = []
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            url = f"{self.endpoint}/{bucket}?{urllib.parse.urlencode(sorted(query.items()))}"
            root = ET.fromstring(self.request(url))  # noqa: S314 - the store we were told to trust
            keys += [el.text or "" for el in root.iter(f"{S3_NS}Key")]
            truncated = root.findtext(f"{S3_NS}IsTruncated") == "true"
            token = root.findtext(f"{S3_NS}NextContinuationToken")
            if not truncated or not token:
                return keys

    def download(self, bucket: str, prefix: str, staging: Path, single_name: str) -> None:
        prefix = prefix.strip("/")
        keys = [k for k in self.list_keys(bucket, prefix) if not k.endswith("/")]
        if not keys:
            raise FetchError(f"no objects under {bucket}/{prefix}")
        for key in keys:
            relative = single_name if key == prefix else key[len(prefix) :].lstrip("/")
            target = safe_join(staging, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.request(f"{self.endpoint}/{bucket}/{urllib.parse.quote(key)}"))


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
    uri: str, staging: Path, credentials: Mapping[str, str], get: Fetcher, single_name: str
) -> None:
    headers = {"Authorization": f"Bearer {credentials['token']}"} if "token" in credentials else {}
    body = get(make_request(uri, headers=headers))
    path = urllib.parse.urlsplit(uri).path
    if path.endswith(ARCHIVES):
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / PurePosixPath(path).name
            archive.write_bytes(body)
            unpack(archive, staging)
    else:
        (staging / single_name).write_bytes(body)


def fetch_pvc(rest: str, staging: Path, pvc_root: Path, single_name: str) -> None:
    _claim, _, path = rest.partition("/")
    source = safe_join(pvc_root, path) if path else pvc_root
    if source.is_dir():
        shutil.copytree(source, staging, dirs_exist_ok=True)
    elif source.is_file():
        shutil.copy2(source, staging / single_name)
    else:
        raise FetchError(f"pvc://{rest}: {path or '/'} does not exist on the claim")


def fetch_hf(
    rest: str, staging: Path, credentials: Mapping[str, str], get: Fetcher, endpoint: str
) -> None:
    parts = rest.split("/", 2)
    if len(parts) < 2:
        raise FetchError(f"hf://{rest}: expected hf://<org>/<repo>[@revision][/path]")
    org, repo_rev = parts[0], parts[1]
    subpath = parts[2] if len(parts) > 2 else ""
    repo, _, revision = repo_rev.partition("@")
    revision = revision or "main"
    headers = (
        {"Authorization": f"Bearer {credentials['HF_TOKEN']}"} if "HF_TOKEN" in credentials else {}
    )
    listing_url = f"{endpoint}/api/models/{org}/{repo}/tree/{revision}/{subpath}?recursive=1"
    entries: list[dict[str, Any]] = json.loads(get(make_request(listing_url, headers=headers)))
    files = [e["path"] for e in entries if e.get("type") == "file"]
    if not files:
        raise FetchError(f"hf://{rest}: no files")
    for name in files:
        relative = name[len(subpath) :].lstrip("/") if subpath else name
        target = safe_join(staging, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        url = f"{endpoint}/{org}/{repo}/resolve/{revision}/{urllib.parse.quote(name)}"
        target.write_bytes(get(make_request(url, headers=headers)))


def fetch_to(
    uri: str,
    staging: Path,
    *,
    model_format: str,
    credentials: Mapping[str, str],
    pvc_root: Path,
    get: Fetcher = http_get,
    hf_endpoint: str = "https://huggingface.co",
) -> None:
    """Put the model's files (or its whole model folder) into ``staging``."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise FetchError(f"not a URI: {uri}")
    single = default_file_name(model_format)
    if scheme in ("https", "http"):
        fetch_https(uri, staging, credentials, get, single)
    elif scheme == "pvc":
        fetch_pvc(rest, staging, pvc_root, single)
    elif scheme in ("s3", "gs"):
        bucket, _, prefix = rest.partition("/")
        default = "https://storage.googleapis.com" if scheme == "gs" else None
        region = credentials.get("AWS_REGION", "auto" if scheme == "gs" else "us-east-1")
        endpoint = (
            credentials.get("AWS_ENDPOINT_URL") or default or f"https://s3.{region}.amazonaws.com"
        )
        store = ObjectStore(
            endpoint=endpoint.rstrip("/"),
            region=region,
            access_key=credentials.get("AWS_ACCESS_KEY_ID"),
            secret_key=credentials.get("AWS_SECRET_ACCESS_KEY"),
            get=get,
        )
        store.download(bucket, prefix, staging, single)
    elif scheme == "hf":
        fetch_hf(rest, staging, credentials, get, hf_endpoint)
    else:
        raise FetchError(f"{scheme}:// is not supported by this fetcher yet")


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
    if (staging / "config.pbtxt").is_file() and (staging / version).is_dir():
        shutil.copytree(staging, model, dirs_exist_ok=True)
    else:
        shutil.copytree(staging, version_dir(repository, name, version), dirs_exist_ok=True)
    config = model / "config.pbtxt"
    if overrides or not config.exists():
        config.write_text(render_config(name, model_format, version, overrides))
    return model
