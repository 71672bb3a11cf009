"""`make bench-fetch`: the model fetcher against plain download tools, on the same objects, in
one run.

A real S3-compatible server (gofakes3) and a real OCI registry (go-containerregistry's) run
on 127.0.0.1 with one generated model (3 GiB by default: models are gigabytes, and a
smaller one measures process start more than streaming). Each round, alternating:

- s3://: `curl --aws-sigv4` (a signed GET to a file, nothing checked: the floor) against
  `modeldeploy-runtime fetch` (obstore, streamed, the layout Triton needs), both cold;
- oci://: `curl` of the blob, and `crane blob` (go-containerregistry's client, which checks
  the digest as it reads), against `modeldeploy-runtime fetch` pulling the archive (oras-py,
  every digest checked) without a cache: cold;
- the same archive with the node cache warm, as a second replica on a node starts: the
  fetch step's time when the layers are already there.

Every tool's time includes its process start (the fetcher is a Python process, as in the
pod) and starts with no dirty pages left by the one before; each round runs the tools in a
different order. Reported: medians, throughputs and the ratio fetcher/tool (>= 0.9 is the
target).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from report import markers, write_section  # noqa: E402

from modeldeploy_runtime.archive import Metadata, Reference, package, push  # noqa: E402
from modeldeploy_runtime.fetch import object_store  # noqa: E402
from stores_support import start_registry, start_s3, toolchain_binary  # noqa: E402

BEGIN, END = markers("fetch-bench")
MIB = 1024 * 1024


def timed(run: Callable[[], None]) -> float:
    """Seconds ``run`` takes, starting with no dirty pages left by the one before (their
    writeback would slow whoever comes next)."""
    os.sync()
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def call(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {result.stderr[-1000:]}")


def generate(path: Path, mib: int) -> str:
    hasher = hashlib.sha256()
    block = os.urandom(MIB)
    with path.open("wb") as out:
        for i in range(mib):
            chunk = block[:8] + i.to_bytes(8, "big") + block[16:]
            hasher.update(chunk)
            out.write(chunk)
    return "sha256:" + hasher.hexdigest()


def fetcher(uri: str, repository: Path, *extra: str) -> list[str]:
    """The fetcher's command; the caller empties ``repository`` first, outside the timing."""
    return [
        sys.executable,
        "-m",
        "modeldeploy_runtime",
        "fetch",
        f"--storage-uri={uri}",
        "--model-name=bench",
        "--model-version=1",
        "--format=onnx",
        f"--repository={repository}",
        f"--termination-log={repository.parent / 'termination-log'}",
        *extra,
    ]


def main() -> int:  # noqa: PLR0915 - one run, told in order
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=3072)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if not shutil.which("curl"):
        print("error: curl is not on PATH; install it with: apt-get install curl", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="modeldeploy-fetch-bench-"))
    s3_proc, s3 = start_s3(work)
    registry_proc, registry = start_registry(work)
    try:
        model = work / "model.onnx"
        digest = generate(model, args.size_mib)
        store = object_store("s3", s3.bucket, s3.credentials())
        import obstore  # noqa: PLC0415

        obstore.put(store, "bench/1/model.onnx", model)
        source = work / "triton"
        (source / "1").mkdir(parents=True)
        (source / "config.pbtxt").write_text('name: "bench"\nbackend: "onnxruntime"\n')
        model.rename(source / "1" / "model.onnx")
        archive = work / "archive"
        package(source, archive, Metadata(name="bench", version="1", format="onnx"))
        reference = Reference.parse(f"oci://{registry.host}/bench/model:1")
        manifest_digest = push(archive, reference, {}, plain_http=True, config_dir=work)
        shutil.rmtree(source)
        creds = work / "creds"
        creds.mkdir()
        for key, value in s3.credentials().items():
            (creds / key).write_text(value)
        out = work / "out.bin"
        repository = work / "repository"
        cache = work / "cache"
        blob_url = f"http://{registry.host}/v2/bench/model/blobs/{digest}"
        crane = str(toolchain_binary("crane"))
        keys = s3.credentials()
        tools: dict[str, Callable[[], None]] = {
            "s3 curl --aws-sigv4": lambda: call(
                [
                    "curl",
                    "-fsS",
                    "-o",
                    str(out),
                    "--aws-sigv4",
                    "aws:amz:us-east-1:s3",
                    "--user",
                    f"{keys['AWS_ACCESS_KEY_ID']}:{keys['AWS_SECRET_ACCESS_KEY']}",
                    f"{s3.endpoint}/{s3.bucket}/bench/1/model.onnx",
                ]
            ),
            "s3 fetcher": lambda: call(
                fetcher(f"s3://{s3.bucket}/bench/1", repository, f"--credentials-dir={creds}")
            ),
            "oci curl (blob)": lambda: call(["curl", "-fsS", "-o", str(out), blob_url]),
            "oci crane blob": lambda: call(
                [
                    "sh",
                    "-c",
                    f"{crane} blob --insecure {registry.host}/bench/model@{digest} > {out}",
                ]
            ),
            "oci fetcher, cold": lambda: call(fetcher(str(reference), repository, "--plain-http")),
        }
        times: dict[str, list[float]] = {name: [] for name in tools}
        times["oci fetcher, warm cache"] = []
        names = list(tools)
        for round_ in range(args.rounds):
            # Each round in another order, so no tool always follows the same one.
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                out.unlink(missing_ok=True)
                shutil.rmtree(repository, ignore_errors=True)
                times[name].append(timed(tools[name]))
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(repository, ignore_errors=True)
            call(fetcher(str(reference), repository, "--plain-http", f"--cache-dir={cache}"))
            shutil.rmtree(repository, ignore_errors=True)
            times["oci fetcher, warm cache"].append(
                timed(
                    lambda: call(
                        fetcher(str(reference), repository, "--plain-http", f"--cache-dir={cache}")
                    )
                )
            )
    finally:
        for proc in (s3_proc, registry_proc):
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    mib = args.size_mib

    def rate(name: str) -> str:
        return f"{mib / median[name]:,.0f} MiB/s"

    rows = [
        "| path | median | throughput |",
        "|---|---|---|",
        *(f"| {name} | {median[name]:.2f} s | {rate(name)} |" for name in median),
    ]
    s3_ratio = median["s3 curl --aws-sigv4"] / median["s3 fetcher"]
    oci_ratio = median["oci curl (blob)"] / median["oci fetcher, cold"]
    crane_ratio = median["oci crane blob"] / median["oci fetcher, cold"]
    warm_speedup = median["oci fetcher, cold"] / median["oci fetcher, warm cache"]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join(
        [
            BEGIN,
            f"`make bench-fetch`, {when}, {platform.machine()}, {os.cpu_count()} cores;"
            f" a {mib} MiB model, {args.rounds} rounds alternating, medians; archive"
            f" {manifest_digest[:19]}.",
            "",
            *rows,
            "",
            f"- s3://, fetcher over `curl --aws-sigv4`: **{s3_ratio:.2f}** of curl's throughput"
            " (curl writes one file and checks nothing).",
            f"- oci://, fetcher over `curl` of the blob: **{oci_ratio:.2f}**; over `crane blob`:"
            f" **{crane_ratio:.2f}** (the fetcher checks every digest and lays the model out).",
            f"- A replica on a node whose cache holds the archive: the fetch step takes"
            f" {median['oci fetcher, warm cache']:.2f} s instead of"
            f" {median['oci fetcher, cold']:.2f} s (**{warm_speedup:.0f}x**; hard links, no"
            " download).",
            END,
        ]
    )
    print(section)
    write_section(args.output, "fetch-bench", "Model fetch", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
