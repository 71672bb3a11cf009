"""Model archives against a real OCI registry (go-containerregistry's): package, push, pull
by tag and by digest, every digest verified, the node-local cache shared by concurrent
fetches, and a half-written layer resumed."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modeldeploy_runtime.__main__ import main
from modeldeploy_runtime.archive import ARCHIVE_MANIFEST, TITLE, BlobCache, Puller, Reference
from stores_support import Registry

pytestmark = pytest.mark.stores

CONFIG = """name: "iris-src"
backend: "onnxruntime"
max_batch_size: 8
version_policy: { specific: { versions: [ 7 ] } }
input [ { name: "input" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""
PROFILE: dict[str, dict[str, object]] = {"inputs": {}, "outputs": {}}


def model_folder(root: Path, weights: bytes = b"onnx-weights" * 1000) -> Path:
    folder = root / "src"
    (folder / "7").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(CONFIG)
    (folder / "7" / "model.onnx").write_bytes(weights)
    (folder / "7" / "labels" / "classes.txt").parent.mkdir()
    (folder / "7" / "labels" / "classes.txt").write_text("setosa\nversicolor\nvirginica\n")
    return folder


def pushed(registry: Registry, tmp_path: Path, tag: str, **kw: bytes) -> str:
    """Package and push a model; the digest ``package`` printed."""
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(PROFILE))
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"accuracy": 0.97}))
    argv = [
        "package",
        str(model_folder(tmp_path, **kw)),
        "--name=iris",
        "--version=7",
        "--format=onnx",
        "--framework=sklearn=1.5",
        "--training=run=mlflow:42",
        f"--metrics={metrics}",
        f"--reference-profile={profile}",
        f"--output={tmp_path / 'archive'}",
        f"--push=oci://{registry.host}/models/iris:{tag}",
        "--plain-http",
    ]
    assert main(argv) == 0
    return manifest_of(f"oci://{registry.host}/models/iris:{tag}", tmp_path)[1]


def manifest_of(uri: str, work: Path) -> tuple[dict[str, Any], str]:
    """The OCI manifest the registry holds for ``uri``, and its digest."""
    puller = Puller(Reference.parse(uri), {}, plain_http=True, config_dir=work, cache=None)
    return puller.manifest()


def fetch(uri: str, where: Path, *extra: str) -> tuple[int, dict[str, object] | str]:
    log = where / "termination-log"
    where.mkdir(parents=True, exist_ok=True)
    code = main(
        [
            "fetch",
            f"--storage-uri={uri}",
            "--model-name=iris",
            "--model-version=3",
            "--format=onnx",
            f"--repository={where / 'repo'}",
            "--plain-http",
            f"--termination-log={log}",
            *extra,
        ]
    )
    text = log.read_text()
    return code, json.loads(text) if code == 0 else text


def test_an_archive_is_served_from_its_digest_with_its_config_and_manifest(
    registry: Registry, tmp_path: Path
) -> None:
    digest = pushed(registry, tmp_path, "v7")
    for uri in (
        f"oci://{registry.host}/models/iris:v7",
        f"oci://{registry.host}/models/iris@{digest}",
    ):
        where = tmp_path / uri.rsplit("/", 1)[1].replace(":", "-").replace("@", "-")
        code, report = fetch(uri, where)
        assert code == 0, report
        assert isinstance(report, dict)
        assert report["digest"] == digest
        assert report["archive"] == {
            "name": "iris",
            "version": "7",
            "format": "onnx",
            "platform": "onnxruntime",
        }
        model = where / "repo" / "iris"
        # The archive's version folder serves as the spec's version; the config is the
        # archive's, named for the repository's folder.
        assert (model / "3" / "model.onnx").read_bytes() == b"onnx-weights" * 1000
        assert (model / "3" / "labels" / "classes.txt").is_file()
        config = (model / "config.pbtxt").read_text()
        assert 'name: "iris"' in config
        assert "max_batch_size: 8" in config
        assert "versions: 3" in config  # the version policy follows the renamed folder
        manifest = json.loads((model / ARCHIVE_MANIFEST).read_text())
        assert manifest["inputs"] == [{"name": "input", "dataType": "FP32", "dims": [4]}]
        assert manifest["metrics"] == {"accuracy": 0.97}
        assert manifest["training"] == {"run": "mlflow:42"}
        assert manifest["referenceProfile"] == PROFILE


def test_a_wrong_digest_and_a_corrupted_layer_fail_with_the_cause(
    registry: Registry, tmp_path: Path
) -> None:
    pushed(registry, tmp_path, "corrupt", weights=b"w" * 50_000)
    other = "sha256:" + "0" * 64
    code, message = fetch(f"oci://{registry.host}/models/iris@{other}", tmp_path / "a")
    assert code == 1
    assert "not found" in str(message) or other in str(message)

    manifest = manifest_of(f"oci://{registry.host}/models/iris:corrupt", tmp_path)[0]
    weights = next(x for x in manifest["layers"] if x["annotations"][TITLE].endswith(".onnx"))
    # go-containerregistry's registry checks blobs as it reads them, so the corruption
    # happens on the way (a bad mirror or proxy): one byte of that blob flipped in transit.
    with tampering_proxy(registry.host, weights["digest"]) as host:
        code, message = fetch(f"oci://{host}/models/iris:corrupt", tmp_path / "b")
    assert code == 1
    assert "7/model.onnx is corrupted" in str(message)
    assert weights["digest"] in str(message)
    assert not (tmp_path / "b" / "repo" / "iris").exists()


@contextlib.contextmanager
def tampering_proxy(upstream: str, digest: str) -> Iterator[str]:
    """An HTTP proxy to the registry that flips the first byte of one blob's body."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            request = urllib.request.Request(f"http://{upstream}{self.path}", headers=headers)
            try:
                answer = urllib.request.urlopen(request, timeout=30)  # noqa: S310
            except urllib.error.HTTPError as error:
                answer = error
            body = answer.read()
            if digest in self.path and body:
                body = bytes([body[0] ^ 0xFF]) + body[1:]
            self.send_response(answer.status)
            for key, value in answer.headers.items():
                if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_node_cache_serves_a_second_replica_and_two_fetches_download_once(
    registry: Registry, tmp_path: Path
) -> None:
    weights = os.urandom(3 * 1024 * 1024)
    pushed(registry, tmp_path, "cached", weights=weights)
    uri = f"oci://{registry.host}/models/iris:cached"
    cache = tmp_path / "node-cache"
    reports: list[dict[str, object]] = []

    def one(name: str) -> None:
        code, report = fetch(uri, tmp_path / name, f"--cache-dir={cache}")
        assert code == 0, report
        assert isinstance(report, dict)
        reports.append(report)

    threads = [threading.Thread(target=one, args=(f"pod-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = sum(int(r["downloaded_bytes"]) for r in reports)  # type: ignore[call-overload]
    assert len(weights) <= total < 2 * len(weights)  # the weights came down once
    one("pod-2")  # a third replica on the node, later: nothing downloaded
    assert reports[-1]["downloaded_bytes"] == 0
    assert reports[-1]["warm"] is True
    served = tmp_path / "pod-2" / "repo" / "iris" / "3" / "model.onnx"
    assert served.read_bytes() == weights
    assert served.stat().st_nlink >= 2  # a hard link into the cache, not a copy


def test_a_half_written_layer_is_resumed_and_eviction_keeps_the_cache_bounded(
    registry: Registry, tmp_path: Path
) -> None:
    weights = os.urandom(2 * 1024 * 1024)
    pushed(registry, tmp_path, "resume", weights=weights)
    uri = f"oci://{registry.host}/models/iris:resume"
    manifest = manifest_of(uri, tmp_path)[0]
    layer = next(x for x in manifest["layers"] if x["annotations"][TITLE].endswith(".onnx"))
    cache = BlobCache(tmp_path / "node-cache", max_bytes=10 * 1024 * 1024)
    cache.partial(layer["digest"]).write_bytes(weights[: 1024 * 1024])  # a killed fetch's
    code, report = fetch(uri, tmp_path / "pod", f"--cache-dir={cache.root}")
    assert code == 0, report
    assert isinstance(report, dict)
    others = sum(x["size"] for x in manifest["layers"]) - layer["size"] + manifest["config"]["size"]
    assert report["downloaded_bytes"] == len(weights) - 1024 * 1024 + others

    # Past its limit, the least recently used blobs that no model links to go first.
    stale = cache.path("sha256:" + "a" * 64)
    stale.write_bytes(b"s" * (9 * 1024 * 1024))
    os.utime(stale, (1, 1))
    this = {x["digest"] for x in [*manifest["layers"], manifest["config"]]}
    with cache.lock("sha256:" + "a" * 64):  # another pod is linking it: it stays for now
        assert cache.evict(keep=this) == 0
    assert stale.exists()
    assert cache.evict(keep=this) == 9 * 1024 * 1024
    assert not stale.exists()
    assert cache.path(layer["digest"]).exists()


def test_a_folder_pushed_with_oras_is_fetched_as_the_model(
    registry: Registry, tmp_path: Path
) -> None:
    """`oras push reg/iris:1 ./iris` tars the folder into one layer (oras-py does as the ORAS
    CLI does): the fetcher unpacks it, safely, and its contents are the model folder."""
    import oras.provider  # noqa: PLC0415 - the ORAS client, as a user would push

    folder = model_folder(tmp_path)
    (folder / "7").rename(folder / "3")  # no manifest here: the folder names the spec's version
    (folder / "config.pbtxt").write_text('name: "iris"\nbackend: "onnxruntime"\n')
    client = oras.provider.Registry(hostname=registry.host, insecure=True)
    client.push(f"{registry.host}/plain/iris:1", files=[str(folder)], disable_path_validation=True)
    code, report = fetch(f"oci://{registry.host}/plain/iris:1", tmp_path / "pod")
    assert code == 0, report
    model = tmp_path / "pod" / "repo" / "iris"
    assert (model / "3" / "model.onnx").read_bytes() == b"onnx-weights" * 1000
    assert (model / "3" / "labels" / "classes.txt").is_file()
    assert (model / "config.pbtxt").read_text() == 'name: "iris"\nbackend: "onnxruntime"\n'
    assert not list((tmp_path / "pod" / "repo").rglob("*.tar.gz"))
