"""The fetcher against a real S3-compatible server (gofakes3): folders and single objects,
prefix boundaries, streaming with bounded memory, clear failures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import obstore
import pytest

from modeldeploy_runtime.fetch import FetchError, fetch_to, object_store
from stores_support import S3Server, memory_cgroup

pytestmark = pytest.mark.stores


def put(s3: S3Server, objects: dict[str, bytes]) -> None:
    store = object_store("s3", s3.bucket, s3.credentials())  # the fetcher's own client
    for key, data in objects.items():
        obstore.put(store, key, data)


def test_a_folder_comes_whole_and_its_neighbours_stay_out(s3: S3Server, tmp_path: Path) -> None:
    put(
        s3,
        {
            "bert/3/model.onnx": b"onnx-bytes",
            "bert/3/tokenizer/vocab.txt": b"a b c",
            "bert/3-old/model.onnx": b"stale",
            "bert/30/model.onnx": b"other",
        },
    )
    fetch_to(
        f"s3://{s3.bucket}/bert/3",
        tmp_path,
        model_format="onnx",
        credentials=s3.credentials(),
        pvc_root=tmp_path,
    )
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["model.onnx", "tokenizer/vocab.txt"]
    assert (tmp_path / "model.onnx").read_bytes() == b"onnx-bytes"


def test_a_single_object_takes_the_formats_file_name(s3: S3Server, tmp_path: Path) -> None:
    put(s3, {"single/resnet.onnx": b"single"})
    fetch_to(
        f"s3://{s3.bucket}/single/resnet.onnx",
        tmp_path,
        model_format="onnx",
        credentials=s3.credentials(),
        pvc_root=tmp_path,
    )
    assert (tmp_path / "model.onnx").read_bytes() == b"single"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://models/absent", "no objects under absent/"),
        ("s3://no-such-bucket/x", "s3://no-such-bucket/x: "),
    ],
)
def test_missing_models_fail_clearly(s3: S3Server, tmp_path: Path, uri: str, message: str) -> None:
    with pytest.raises(FetchError, match=message):
        fetch_to(
            uri, tmp_path, model_format="onnx", credentials=s3.credentials(), pvc_root=tmp_path
        )


LARGE_MIB = int(os.environ.get("MODELDEPLOY_LARGE_MODEL_MIB", "3072"))
LIMIT_MIB = 256


def test_a_3_gib_model_is_fetched_and_verified_under_a_256_mib_memory_limit(
    s3: S3Server, tmp_path: Path
) -> None:
    """A 3 GiB model (generated here) through `modeldeploy-runtime fetch` in a memory cgroup
    limited to 256 MiB without swap, as a pod's limit is, with spec.model.digest checked: it
    is never OOM-killed, and its peak (page cache included) and its RSS are reported. (The old
    fetcher read every object whole into memory: 1,087 MiB for a 1 GiB model.)"""
    size = LARGE_MIB * 1024 * 1024
    source = tmp_path / "generated.onnx"
    hasher = hashlib.sha256()
    block = os.urandom(1024 * 1024)
    with source.open("wb") as out:
        for i in range(LARGE_MIB):
            chunk = block[:8] + i.to_bytes(8, "big") + block[16:]  # no two MiB alike
            hasher.update(chunk)
            out.write(chunk)
    digest = "sha256:" + hasher.hexdigest()
    store = object_store("s3", s3.bucket, s3.credentials())
    obstore.put(store, "large/1/model.onnx", source)  # streamed, multipart
    source.unlink()
    repository = tmp_path / "repository"
    command = fetch_command(s3, f"s3://{s3.bucket}/large/1", repository, tmp_path)
    # VmHWM, not getrusage: ru_maxrss survives exec and would count this test's own memory.
    script = (
        "import pathlib, sys\n"
        "from modeldeploy_runtime.__main__ import main\n"
        "code = main(sys.argv[1:])\n"
        "status = pathlib.Path('/proc/self/status').read_text().splitlines()\n"
        "print('RSS', next(l.split()[1] for l in status if l.startswith('VmHWM:')))\n"
        "sys.exit(code)\n"
    )
    argv = [sys.executable, "-c", script, *command[3:], f"--digest={digest}"]
    with memory_cgroup(LIMIT_MIB * 1024 * 1024) as cgroup:
        started = time.monotonic()
        result = subprocess.run(
            argv, capture_output=True, text=True, check=False, preexec_fn=cgroup.join
        )
        seconds = time.monotonic() - started
        peak_mib, kills = cgroup.peak_bytes() / 2**20, cgroup.oom_kills()
    assert result.returncode == 0, result.stderr[-2000:]
    assert kills == 0
    fetched = json.loads(result.stdout.splitlines()[0])
    assert fetched["files"] == ["big/1/model.onnx", "big/config.pbtxt"]
    assert fetched["digest"] == digest
    assert (repository / "big" / "1" / "model.onnx").stat().st_size == size
    rss_mib = int(result.stdout.split("RSS ")[1]) / 1024
    print(
        f"fetched {LARGE_MIB} MiB in {seconds:.1f} s under a {LIMIT_MIB} MiB limit:"
        f" cgroup peak {peak_mib:.0f} MiB (page cache included), peak RSS {rss_mib:.0f} MiB"
    )
    # The interpreter with the runtime's imports is about 65 MiB; the download adds chunks.
    assert rss_mib < 160, f"peak RSS {rss_mib:.0f} MiB"


def fetch_command(s3: S3Server, uri: str, repository: Path, work: Path) -> list[str]:
    creds = work / "creds"
    creds.mkdir(exist_ok=True)
    for key, value in s3.credentials().items():
        (creds / key).write_text(value)
    return [
        sys.executable,
        "-m",
        "modeldeploy_runtime",
        "fetch",
        f"--storage-uri={uri}",
        "--model-name=big",
        "--model-version=1",
        "--format=onnx",
        f"--repository={repository}",
        f"--credentials-dir={creds}",
        f"--termination-log={work / 'termination'}",
    ]


def test_a_fetch_killed_halfway_resumes_where_it_stopped(s3: S3Server, tmp_path: Path) -> None:
    size = 192 * 1024 * 1024
    data = os.urandom(1024 * 1024) * (size // (1024 * 1024))
    put(s3, {"resume/1/model.onnx": data})
    digest = hashlib.sha256(data).hexdigest()
    del data
    repository = tmp_path / "repository"
    command = fetch_command(s3, f"s3://{s3.bucket}/resume/1", repository, tmp_path)
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    partial: list[Path] = []
    while time.monotonic() < deadline and first.poll() is None:
        partial = list(repository.glob(".staging-*/.model.onnx.partial"))
        if partial and partial[0].stat().st_size > 16 * 1024 * 1024:
            break
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)  # as the OOM killer or an eviction would
    first.wait()
    assert partial, "the fetch never started writing"
    done_before = partial[0].stat().st_size
    assert 0 < done_before < size, "killed too late to prove anything"

    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    # Only what was missing came over again.
    assert json.loads(result.stdout)["downloaded_bytes"] == size - done_before
    model = repository / "big" / "1" / "model.onnx"
    with model.open("rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == digest
    assert not list(repository.glob(".staging-*")), "the staging folder is cleaned up"


def test_a_changed_object_is_fetched_again_not_spliced(s3: S3Server, tmp_path: Path) -> None:
    """A partial file of an older object (another ETag) is not resumed into the new one."""
    put(s3, {"changed/1/model.onnx": b"new-" * 1000})
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / ".model.onnx.partial").write_bytes(b"old-" * 500)
    (staging / ".model.onnx.etag").write_text('"an-older-etag"')
    fetch_to(
        f"s3://{s3.bucket}/changed/1",
        staging,
        model_format="onnx",
        credentials=s3.credentials(),
        pvc_root=tmp_path,
    )
    assert (staging / "model.onnx").read_bytes() == b"new-" * 1000


def test_the_digest_is_checked_and_a_corrupted_object_fails_clearly(
    s3: S3Server, tmp_path: Path
) -> None:
    good = b"weights" * 1000
    put(s3, {"digest/1/model.onnx": good, "digest/1/labels.txt": b"cat dog"})
    source = tmp_path / "source"
    source.mkdir()
    (source / "model.onnx").write_bytes(good)
    (source / "labels.txt").write_bytes(b"cat dog")
    printed = subprocess.run(
        [sys.executable, "-m", "modeldeploy_runtime", "digest", str(source)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    repository = tmp_path / "repository"
    command = fetch_command(s3, f"s3://{s3.bucket}/digest/1", repository, tmp_path)
    ok = subprocess.run(
        [*command, f"--digest={printed}"], capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok.stderr

    put(s3, {"digest/1/model.onnx": good[:-1] + b"X"})  # one byte changed at the source
    shutil.rmtree(repository)
    bad = subprocess.run(
        [*command, f"--digest={printed}"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1
    message = (tmp_path / "termination").read_text()
    assert f"digest mismatch: spec.model.digest is {printed}" in message
    assert "changed or corrupted at the source" in message
    assert not list(repository.glob(".staging-*")), "bad bytes are not kept for a resume"
