"""`make bench-runtime`: direct Triton against the path through the sidecar, in one run.

One load generator (asyncio, keep-alive HTTP/1.1, one connection per concurrent client)
drives a real Triton (nvidia-pytriton's tritonserver on CPU) directly and through
`modeldeploy-runtime serve`, alternating, at concurrency 1, 8 and 64, for a trivial model and
for one that takes 2 ms. The sidecar runs as it does in a pod: sampling 10 % of requests for
drift against a reference profile. Reported: throughput ratio, added p50/p99 latency, the
sidecar's CPU seconds per 1000 requests and its RSS, and the drift cost per feature value.

The load generator shares the 2 cores with Triton and the sidecar, so absolute numbers are
low; read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from report import markers, percentile, write_section  # noqa: E402

from localcluster.operator import free_port  # noqa: E402
from modeldeploy_runtime.drift import DriftWindow, Profile, decode_tensors, profile_features  # noqa: E402
from triton_support import start_sidecar, start_triton, stop  # noqa: E402

BEGIN, END = markers("runtime-bench")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    requests: int
    seconds: float
    latencies: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return percentile(self.latencies, q)


def request_bytes(model: str) -> bytes:
    body = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1, -0.3, 1.2, 0.5]}
            ]
        }
    ).encode()
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\n"
        "Host: bench\r\nContent-Type: application/json\r\n"
    )
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def client(address: str, payload: bytes, until: float, latencies: list[float]) -> None:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(payload)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.decode(errors="replace"))
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def load(address: str, model: str, concurrency: int, seconds: float) -> Run:
    payload = request_bytes(model)
    warm: list[float] = []
    await asyncio.gather(
        *(client(address, payload, time.perf_counter() + 0.3, warm) for _ in range(concurrency))
    )
    latencies: list[float] = []
    started = time.perf_counter()
    await asyncio.gather(
        *(client(address, payload, started + seconds, latencies) for _ in range(concurrency))
    )
    return Run(len(latencies), time.perf_counter() - started, latencies)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int, key: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drift_cost(features: int = 64, rows: int = 32, rounds: int = 300) -> float:
    """Nanoseconds per feature value to decode a JSON request and bin it into the window."""
    rng = np.random.default_rng(0)
    profile = Profile(
        inputs={"x": profile_features("x", rng.normal(size=(5000, features)), 10)}, outputs={}
    )
    window = DriftWindow(profile, window=2000)
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [rows, features],
                    "datatype": "FP32",
                    "data": rng.normal(size=rows * features).round(4).tolist(),
                }
            ]
        }
    ).encode()
    started = time.perf_counter()
    for _ in range(rounds):
        window.add("input", decode_tensors([], body, "inputs"))
    return (time.perf_counter() - started) / (rounds * rows * features) * 1e9


# The last sidecar before the strict front (a hand-written parser forwarding raw bytes).
BASELINE = "e332d70"


def checkout(revision: str, into: Path) -> Path:
    """``runtime/`` of ``revision``, extracted into ``into``; the folder to put on the path."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "runtime/modeldeploy_runtime"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "runtime"


def parser_cost(rounds: int = 20000) -> dict[str, float]:
    """Microseconds to parse one keep-alive inference request (head and a 200-byte JSON body):
    the sidecar's front (llhttp through httptools, plus its own checks and the re-serialised
    head) against h11, the pure-Python parser the issue named as the other candidate."""
    import h11  # noqa: PLC0415 - a dev dependency, for this comparison only

    from modeldeploy_runtime.http1 import ByteBudget, RequestParser  # noqa: PLC0415

    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1] * 4}]}
    ).encode()
    body += b" " * max(0, 200 - len(body))
    request = (
        b"POST /v2/models/features/infer HTTP/1.1\r\nHost: sidecar\r\n"
        b"Content-Type: application/json\r\nUser-Agent: bench\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    out: dict[str, float] = {}

    async def ours() -> float:
        parser = RequestParser(
            lambda r: None,
            max_body=1 << 20,
            budget=ByteBudget(1 << 30),
            header_timeout=10,
            body_timeout=10,
            idle_timeout=10,
        )
        started = time.perf_counter()
        for _ in range(rounds):
            parser.feed(request)
            parsed = parser.take()
            assert parsed is not None
            parsed.head()
        return (time.perf_counter() - started) / rounds * 1e6

    out["httptools"] = asyncio.run(ours())
    connection = h11.Connection(h11.SERVER)
    started = time.perf_counter()
    for _ in range(rounds):
        connection.receive_data(request)
        while not isinstance(connection.next_event(), h11.EndOfMessage):
            pass
        connection.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
        connection.send(h11.EndOfMessage())
        connection.start_next_cycle()
    out["h11"] = (time.perf_counter() - started) / rounds * 1e6
    return out


class BlackHole:
    """A canary that accepts connections and never answers: every copy times out."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.held.append(connection)

    def close(self) -> None:
        self.server.close()
        for connection in self.held:
            connection.close()


SHADOW_CASES = (
    ("no shadow step", None),
    ("10 %, healthy canary", "healthy"),
    ("10 %, canary times out", "timeout"),
    ("10 %, canary gone", "gone"),
)


def shadow_cost(triton: Any, work: Path, seconds: float, rounds: int = 3) -> list[dict[str, Any]]:
    """What copying 10 % of requests to a canary costs the stable sidecar: CPU per request and
    the user's p99, against the same sidecar with no shadow step, runs alternating."""
    canary_proc, canary = start_sidecar(
        triton, work / "canary.log", (free_port(), free_port(), free_port()), track="canary"
    )
    hole = BlackHole()
    targets = {"healthy": canary.http, "timeout": hole.address, "gone": f"127.0.0.1:{free_port()}"}
    procs = {}
    for name, target in SHADOW_CASES:
        flags: dict[str, Any] = {"model": "features_2ms", "shadow_timeout_seconds": 2}
        if target is not None:
            config = {"revision": "bench", "percent": 10, "targets": [targets[target]]}
            (work / f"shadow-{target}.json").write_text(json.dumps(config))
            flags["shadow_file"] = work / f"shadow-{target}.json"
        procs[name] = start_sidecar(
            triton, work / f"stable-{target}.log", (free_port(), free_port(), free_port()), **flags
        )
    time.sleep(1.2)  # the sidecars look at their shadow file once a second
    cpu: dict[str, list[float]] = {name: [] for name, _ in SHADOW_CASES}
    p99: dict[str, list[float]] = {name: [] for name, _ in SHADOW_CASES}
    try:
        for _ in range(rounds):
            for name, _ in SHADOW_CASES:
                proc, sidecar = procs[name]
                before = cpu_seconds(proc.pid)
                run = asyncio.run(load(sidecar.http, "features_2ms", 8, seconds))
                cpu[name].append((cpu_seconds(proc.pid) - before) / run.requests * 1000)
                p99[name].append(run.percentile(0.99) * 1000)
    finally:
        for proc, _ in procs.values():
            stop(proc)
        stop(canary_proc)
        hole.close()
    base_cpu = statistics.median(cpu[SHADOW_CASES[0][0]])
    base_p99 = statistics.median(p99[SHADOW_CASES[0][0]])
    return [
        {
            "case": name,
            "cpu_per_1000": statistics.median(cpu[name]),
            "cpu_ratio": statistics.median(cpu[name]) / base_cpu,
            "p99_ms": statistics.median(p99[name]),
            "p99_ratio": statistics.median(p99[name]) / base_p99,
        }
        for name, _ in SHADOW_CASES
    ]


def render_shadow(results: dict[str, Any]) -> str:
    begin, end = markers("shadow-bench")
    lines = [
        begin,
        f"Measured {results['date']} on {results['machine']}: `make bench-runtime`. The stable"
        " sidecar in front of the 2 ms model at concurrency 8, copying 10 % of requests to a"
        f" canary, against the same sidecar with no shadow step; {results['seconds']:.0f} s"
        f" per run, {results['rounds']} rounds alternating, medians. The healthy canary is a"
        " sidecar in front of the same Triton (so its copies also load the shared cores); the"
        " one that times out accepts and never answers (2 s timeout); the gone one refuses.",
        "",
        "| case | stable sidecar CPU s / 1000 req | CPU ratio | user p99 | p99 ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in results["shadow"]:
        lines.append(
            f"| {row['case']} | {row['cpu_per_1000']:.3f} | {row['cpu_ratio']:.2f}"
            f" | {row['p99_ms']:.2f} ms | {row['p99_ratio']:.2f} |"
        )
    lines += [
        "",
        "Goals (issue #16, not asserted in tests): at 10 % the copying costs the stable sidecar"
        " under 5 % more CPU per request; a canary that times out or is gone leaves the user's"
        " p99 within 10 % of no shadow step. A copy is a second HTTP exchange (send, read the"
        " answer, compare: the comparison itself is about 50 us), so with a healthy canary the"
        " stable sidecar's CPU per request grows by roughly a tenth of a proxied request's;"
        " here the canary and the load generator also share the stable sidecar's two cores."
        " A canary that times out costs least: its copies fill the queue and are dropped; one"
        " that is gone is not tried again for a second after a refused connect.",
        end,
    ]
    return "\n".join(lines)


def bench_shadow(triton: Any, work: Path, seconds: float, output: Path) -> None:
    section = render_shadow(
        {
            "date": dt.date.today().isoformat(),
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
            "seconds": seconds,
            "rounds": 3,
            "shadow": shadow_cost(triton, work, seconds),
        }
    )
    print(section)
    write_section(output, "shadow-bench", "Shadow copies", section)


def render(results: dict[str, Any]) -> str:
    lines = [
        BEGIN,
        f"Measured {results['date']} on {results['machine']}; {results['seconds']:.0f} s per run,"
        " direct and sidecar runs alternating; the load generator shares the cores."
        " `make bench-runtime` regenerates this section.",
        "",
        "| model | concurrency | direct req/s | sidecar req/s | ratio | added p50 | added p99"
        " | sidecar CPU s / 1000 req | baseline ratio | baseline CPU s / 1000 req |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        old = row.get("baseline")
        lines.append(
            f"| {row['model']} | {row['concurrency']} | {row['direct_rps']:.0f}"
            f" | {row['sidecar_rps']:.0f}"
            f" | {row['ratio']:.2f} | {row['added_p50_ms']:+.2f} ms | {row['added_p99_ms']:+.2f} ms"
            f" | {row['cpu_per_1000']:.3f}"
            + (f" | {old['ratio']:.2f} | {old['cpu_per_1000']:.3f} |" if old else " | - | - |")
        )
    lines += [
        "",
        f"Sidecar peak RSS: {results['rss_mib']:.0f} MiB. Drift (decode JSON and bin into the"
        f" window, 64 features x 32 rows): {results['drift_ns']:.0f} ns per feature value.",
        "",
        "The strict front's parser, per keep-alive inference request (head and a 200-byte"
        f" body, in process): llhttp through httptools with the sidecar's checks and the"
        f" re-serialised head {results['parser_us']['httptools']:.1f} us; h11"
        f" {results['parser_us']['h11']:.1f} us"
        f" ({results['parser_us']['h11'] / results['parser_us']['httptools']:.1f}x)."
        f" Baseline: the sidecar of {results['baseline'] or '-'} (before the strict front: a"
        " hand-written lenient parser forwarding raw bytes), run in the same run against the"
        " same direct numbers.",
        "",
        "Goals (not asserted in tests): added p50 <= 0.3 ms and p99 <= 1 ms; throughput ratio"
        " >= 0.95 for the 2 ms model and >= 0.6 for the trivial one; drift <= 1 us per feature"
        " value.",
        END,
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--shadow-only", action="store_true", help="only the shadow-copy section (a quick run)"
    )
    parser.add_argument(
        "--baseline",
        default=BASELINE,
        help="a git revision whose sidecar runs too, as the baseline of this one ('' for none)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="runtime-bench-"))
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(5000, 4))
    profile = Profile(
        inputs={"x": profile_features("x", reference, 10)},
        outputs={"score": profile_features("score", reference.sum(axis=1, keepdims=True), 10)},
    )
    (work / "profile.json").write_text(json.dumps(profile.to_json()))
    triton_proc, triton = start_triton(work / "triton.log", (free_port(), free_port(), free_port()))
    try:
        bench_shadow(triton, work, args.seconds, args.output)
    except BaseException:
        stop(triton_proc, group=True)
        raise
    if args.shadow_only:
        stop(triton_proc, group=True)
        return 0
    sidecar_proc, sidecar = start_sidecar(
        triton,
        work / "sidecar.log",
        (free_port(), free_port(), free_port()),
        reference_profile=work / "profile.json",
        sample_rate=0.1,
    )
    baseline_proc = baseline = None
    if args.baseline:
        baseline_proc, baseline = start_sidecar(
            triton,
            work / "baseline.log",
            (free_port(), free_port(), free_port()),
            code=checkout(args.baseline, work / "baseline"),
            reference_profile=work / "profile.json",
            sample_rate=0.1,
        )
    rows = []
    try:
        for model in ("features", "features_2ms"):
            for concurrency in args.concurrency:
                print(f"[bench] {model} at concurrency {concurrency}", flush=True)
                direct = asyncio.run(load(triton.http, model, concurrency, args.seconds))
                cpu_before = cpu_seconds(sidecar_proc.pid)
                proxied = asyncio.run(load(sidecar.http, model, concurrency, args.seconds))
                cpu = cpu_seconds(sidecar_proc.pid) - cpu_before
                before = None
                if baseline is not None and baseline_proc is not None:
                    cpu_old = cpu_seconds(baseline_proc.pid)
                    old = asyncio.run(load(baseline.http, model, concurrency, args.seconds))
                    before = {
                        "rps": old.throughput,
                        "ratio": old.throughput / direct.throughput,
                        "cpu_per_1000": (cpu_seconds(baseline_proc.pid) - cpu_old)
                        / old.requests
                        * 1000,
                    }
                rows.append(
                    {
                        "model": "trivial" if model == "features" else "2 ms",
                        "concurrency": concurrency,
                        "direct_rps": direct.throughput,
                        "sidecar_rps": proxied.throughput,
                        "ratio": proxied.throughput / direct.throughput,
                        "added_p50_ms": (proxied.percentile(0.5) - direct.percentile(0.5)) * 1000,
                        "added_p99_ms": (proxied.percentile(0.99) - direct.percentile(0.99)) * 1000,
                        "direct_p50_ms": statistics.median(direct.latencies) * 1000,
                        "cpu_per_1000": cpu / proxied.requests * 1000,
                        "baseline": before,
                    }
                )
        rss = rss_mib(sidecar_proc.pid)
    finally:
        stop(sidecar_proc)
        if baseline_proc is not None:
            stop(baseline_proc)
        stop(triton_proc, group=True)
    results = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "seconds": args.seconds,
        "baseline": args.baseline,
        "rows": rows,
        "rss_mib": rss,
        "drift_ns": drift_cost(),
        "parser_us": parser_cost(),
    }
    section = render(results)
    print(section)
    write_section(args.output, "runtime-bench", "Runtime sidecar", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
