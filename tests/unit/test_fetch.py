"""The model fetcher against a local HTTP server: files, archives and a Hub-style API, laid
out as a Triton model repository. Object stores: tests/stores (a real S3 server)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from modeldeploy_runtime.__main__ import main as runtime_main
from modeldeploy_runtime.archive import Reference
from modeldeploy_runtime.fetch import (
    FetchError,
    Http,
    content_digest,
    fetch_to,
    install,
    origin,
)
from modeldeploy_runtime.model_repository import render_config
from modeldeploy_runtime.streams import write_chunks


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


FILES = {
    "/model.onnx": b"single-onnx",
    "/bundle.tar.gz": tar_gz({"model.onnx": b"from-archive", "extra/labels.txt": b"cat"}),
    "/evil.tar.gz": tar_gz({"../escape.txt": b"nope"}),
}
# The Hub's API as huggingface_hub calls it (no Hub is reachable here): the revision's commit
# and its files, then each file's metadata (HEAD) and bytes at that commit.
HF_COMMIT = "c0ffee" * 6 + "c0de"
HF_FILES = {"onnx/model.onnx": b"hub-onnx", "README.md": b"# repo"}


class Handler(BaseHTTPRequestHandler):
    requests: ClassVar[list[tuple[str, dict[str, str]]]] = []
    redirect_to: ClassVar[str] = ""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        Handler.requests.append((self.path, dict(self.headers)))
        if url.path == "/moved" and Handler.redirect_to:
            self.send_response(302)
            self.send_header("Location", Handler.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif url.path in FILES:
            body, etag = FILES[url.path], self.hub_headers(FILES[url.path])["ETag"]
            asked = self.headers.get("Range", "")
            if asked.startswith("bytes=") and self.headers.get("If-Range") == etag:
                start = int(asked.removeprefix("bytes=").split("-")[0])
                headers = {
                    "ETag": etag,
                    "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}",
                }
                self.reply(body[start:], 206, headers)
            else:
                self.reply(body, headers={"ETag": etag})
        elif url.path == "/api/models/org/repo/revision/main":
            siblings = [{"rfilename": name} for name in HF_FILES]
            self.reply(
                json.dumps({"id": "org/repo", "sha": HF_COMMIT, "siblings": siblings}).encode()
            )
        elif url.path == f"/api/models/org/repo/tree/{HF_COMMIT}":
            tree = [
                {"type": "file", "path": name, "size": len(body), "oid": "0" * 40}
                for name, body in HF_FILES.items()
            ]
            self.reply(json.dumps(tree).encode())
        elif (found := self.hub_file(url.path)) is not None:
            self.reply(found, headers=self.hub_headers(found))
        else:
            self.reply(b"", 404)

    def do_HEAD(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        Handler.requests.append((self.path, dict(self.headers)))
        found = self.hub_file(url.path)
        self.send_response(200 if found is not None else 404)
        for key, value in self.hub_headers(found or b"").items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(found or b"")))
        self.end_headers()

    @staticmethod
    def hub_file(path: str) -> bytes | None:
        prefix = f"/org/repo/resolve/{HF_COMMIT}/"
        return HF_FILES.get(path.removeprefix(prefix)) if path.startswith(prefix) else None

    @staticmethod
    def hub_headers(body: bytes) -> dict[str, str]:
        return {"X-Repo-Commit": HF_COMMIT, "ETag": f'"{hashlib.sha256(body).hexdigest()}"'}

    def reply(self, body: bytes, code: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[str]:
    Handler.requests = []
    Handler.redirect_to = ""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_single_file_over_http(server: str, tmp_path: Path) -> None:
    fetch_to(
        f"{server}/model.onnx",
        tmp_path,
        model_format="onnx",
        credentials={"token": "t0k"},
        pvc_root=tmp_path,
    )
    assert (tmp_path / "model.onnx").read_bytes() == b"single-onnx"
    assert Handler.requests[0][1]["Authorization"] == "Bearer t0k"


def test_archive_is_unpacked_and_cannot_escape(server: str, tmp_path: Path) -> None:
    fetch_to(
        f"{server}/bundle.tar.gz", tmp_path, model_format="onnx", credentials={}, pvc_root=tmp_path
    )
    assert (tmp_path / "model.onnx").read_bytes() == b"from-archive"
    assert (tmp_path / "extra" / "labels.txt").read_bytes() == b"cat"
    with pytest.raises(tarfile.OutsideDestinationError):
        fetch_to(
            f"{server}/evil.tar.gz",
            tmp_path / "x",
            model_format="onnx",
            credentials={},
            pvc_root=tmp_path,
        )


def test_hub_repository(server: str, tmp_path: Path) -> None:
    fetch_to(
        "hf://org/repo/onnx",
        tmp_path,
        model_format="onnx",
        credentials={"HF_TOKEN": "h"},
        pvc_root=tmp_path,
        hf_endpoint=server,
    )
    assert (tmp_path / "model.onnx").read_bytes() == b"hub-onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # only the folder asked
    tokened = [h for path, h in Handler.requests if path.startswith("/org/repo/resolve/")]
    assert tokened
    assert all(h.get("authorization") == "Bearer h" for h in tokened)


def test_pvc_folder_or_file(tmp_path: Path) -> None:
    claim = tmp_path / "claim"
    (claim / "resnet").mkdir(parents=True)
    (claim / "resnet" / "model.onnx").write_bytes(b"pvc")
    fetch_to(
        "pvc://models/resnet", tmp_path / "a", model_format="onnx", credentials={}, pvc_root=claim
    )
    assert (tmp_path / "a" / "model.onnx").read_bytes() == b"pvc"
    (tmp_path / "b").mkdir()
    fetch_to(
        "pvc://models/resnet/model.onnx",
        tmp_path / "b",
        model_format="onnx",
        credentials={},
        pvc_root=claim,
    )
    assert (tmp_path / "b" / "model.onnx").read_bytes() == b"pvc"
    with pytest.raises(FetchError, match="does not exist"):
        fetch_to(
            "pvc://models/missing",
            tmp_path / "c",
            model_format="onnx",
            credentials={},
            pvc_root=claim,
        )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("oci://registry/model:1", "expected oci://<registry host>"),
        ("oci://r.io/model@sha256:abc", "a digest is sha256:<64 hex digits>"),
        ("file:///etc/passwd", "not supported"),
    ],
)
def test_unsupported_sources_fail_clearly(uri: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=message):
        fetch_to(uri, tmp_path, model_format="onnx", credentials={}, pvc_root=tmp_path)


def test_only_http_urls_are_requested() -> None:
    with pytest.raises(FetchError, match="only http"):
        Http().open("file:///etc/passwd")


def test_credentials_never_follow_a_redirect_to_another_origin(server: str, tmp_path: Path) -> None:
    """The token reaches the origin it was given for, never the one a redirect points at
    (another port is another origin), and the query string never reaches a message."""
    other = server.replace("127.0.0.1", "localhost")  # the same server, another origin
    Handler.redirect_to = f"{other}/model.onnx?X-Amz-Signature=secret"
    fetch_to(
        f"{server}/moved",
        tmp_path,
        model_format="onnx",
        credentials={"token": "t0k"},
        pvc_root=tmp_path,
    )
    assert (tmp_path / "model.onnx").read_bytes() == b"single-onnx"
    first, second = Handler.requests
    assert first[0] == "/moved"
    assert first[1]["Authorization"] == "Bearer t0k"
    assert second[0].startswith("/model.onnx")
    assert "Authorization" not in second[1]
    Handler.redirect_to = f"{other}/absent?X-Amz-Signature=secret"
    with pytest.raises(FetchError) as caught:
        fetch_to(
            f"{server}/moved", tmp_path, model_format="onnx", credentials={}, pvc_root=tmp_path
        )
    assert "HTTP 404" in str(caught.value)
    assert "secret" not in str(caught.value)


def test_origins() -> None:
    assert origin("https://a.example/x") == origin("https://A.example:443/y")
    assert origin("https://a.example/x") != origin("http://a.example/x")
    assert origin("http://a.example/x") != origin("http://a.example:8080/x")


def test_a_large_file_streams_to_disk(server: str, tmp_path: Path) -> None:
    FILES["/large.onnx"] = b"x" * (20 * 1024 * 1024 + 5)
    try:
        size = Http().download(f"{server}/large.onnx", tmp_path / "large.onnx")
    finally:
        del FILES["/large.onnx"]
    assert size == 20 * 1024 * 1024 + 5
    assert (tmp_path / "large.onnx").stat().st_size == size
    assert not list(tmp_path.glob(".*.partial"))


def test_install_lays_out_the_repository_with_overrides(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"x")
    model = install(
        staging,
        tmp_path / "models",
        name="bert",
        version="3",
        model_format="onnx",
        overrides={"maxBatchSize": 8, "dynamicBatching": {"preferredBatchSizes": [4, 8]}},
    )
    assert (model / "3" / "model.onnx").read_bytes() == b"x"
    config = (model / "config.pbtxt").read_text()
    assert 'name: "bert"' in config
    assert 'backend: "onnxruntime"' in config
    assert "max_batch_size: 8" in config
    assert "preferred_batch_size: [4, 8]" in config
    assert "versions: [3]" in config


def test_render_config_without_overrides() -> None:
    assert render_config("m", "python", "1", {}) == (
        'name: "m"\nbackend: "python"\nversion_policy: { specific: { versions: [1] } }\n'
    )


def test_cli_failure_reaches_the_termination_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setattr("modeldeploy_runtime.__main__.TERMINATION_LOG", log)
    code = runtime_main(
        [
            "fetch",
            "--storage-uri=ftp://r/m",
            "--model-name=m",
            "--model-version=1",
            "--format=onnx",
            f"--repository={tmp_path / 'models'}",
        ]
    )
    assert code == 1
    assert "ftp:// is not supported" in log.read_text()


def test_digests_of_a_file_and_of_a_folder(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").write_bytes(b"abc")
    (tmp_path / "m" / "sub").mkdir()
    (tmp_path / "m" / "sub" / "vocab.txt").write_bytes(b"x")
    assert content_digest(tmp_path / "m" / "model.onnx") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    manifest = (
        "model.onnx\0ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n"
        f"sub/vocab.txt\0{hashlib.sha256(b'x').hexdigest()}\n"
    )
    assert (
        content_digest(tmp_path / "m") == "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()
    )


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("oci://r.io/team/iris:7", ("r.io", "team/iris", "7", None)),
        ("oci://localhost:5000/iris", ("localhost:5000", "iris", "latest", None)),
        (f"oci://r.io/iris@sha256:{'a' * 64}", ("r.io", "iris", None, f"sha256:{'a' * 64}")),
        (f"oci://r.io/iris:7@sha256:{'b' * 64}", ("r.io", "iris", "7", f"sha256:{'b' * 64}")),
    ],
)
def test_oci_references_parse(uri: str, expected: tuple[str, str, str | None, str | None]) -> None:
    reference = Reference.parse(uri)
    assert (reference.registry, reference.repository, reference.tag, reference.digest) == expected
    assert str(reference) == uri or expected[2] == "latest"


@pytest.mark.parametrize(("validator", "resumed"), [("same", True), ('"changed"', False)])
def test_an_https_download_resumes_only_the_file_it_began(
    server: str, tmp_path: Path, validator: str, resumed: bool
) -> None:
    """A .partial left by a killed fetch continues with Range and If-Range; a file that
    changed since comes whole (the server ignores the range), never spliced."""
    body = FILES["/model.onnx"]
    etag = Handler.hub_headers(body)["ETag"]
    (tmp_path / ".model.onnx.partial").write_bytes(body[:4])
    (tmp_path / ".model.onnx.validator").write_text(etag if validator == "same" else validator)
    fetched = fetch_to(
        f"{server}/model.onnx", tmp_path, model_format="onnx", credentials={}, pvc_root=tmp_path
    )
    assert (tmp_path / "model.onnx").read_bytes() == body
    assert fetched.downloaded_bytes == (len(body) - 4 if resumed else len(body))
    assert Handler.requests[-1][1].get("Range") == "bytes=4-"
    assert not (tmp_path / ".model.onnx.validator").exists()


def test_a_write_error_during_a_streamed_download_reaches_the_caller(tmp_path: Path) -> None:
    """The writer runs on its own thread: its failure (a full disk) still fails the fetch."""

    class FullDisk(io.BytesIO):
        def write(self, data: Any) -> int:
            raise OSError(28, "No space left on device")

    received: list[bytes] = []

    def chunks() -> Iterator[bytes]:
        for i in range(100):
            received.append(b"x")
            yield bytes([i]) * 1024

    with pytest.raises(OSError, match="No space left"):
        write_chunks(chunks(), FullDisk(), hashlib.sha256())
    assert len(received) < 100  # it stopped receiving soon after the writer failed


def test_an_unexpected_error_still_ends_as_a_termination_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "termination-log"

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("mediaType")

    monkeypatch.setattr("modeldeploy_runtime.__main__.fetch_to", broken)
    argv = ["fetch", "--storage-uri=oci://r.io/m:1", "--model-name=m", "--model-version=1"]
    argv += ["--format=onnx", f"--repository={tmp_path / 'models'}", f"--termination-log={log}"]
    assert runtime_main(argv) == 1
    assert "failed unexpectedly: 'mediaType' (KeyError" in log.read_text()
