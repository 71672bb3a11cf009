"""Stopping by PID: real child processes, no cluster."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster.cluster import read_pid_files
from localcluster.processes import (
    exited,
    is_ours,
    process_cmdline,
    processes_mentioning,
    stop_pids,
)

MARKER = "--marker=localcluster-unit-test"


def spawn(code: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", code, MARKER])
    time.sleep(0.3)  # let the interpreter install its signal handlers
    return proc


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def alive_and_ours(pid: int) -> bool:
    return is_ours(pid, MARKER)


def test_stop_pids_terminates_a_polite_process(reap: list[subprocess.Popen[bytes]]) -> None:
    proc = spawn("import time; time.sleep(60)")
    reap.append(proc)
    assert processes_mentioning(MARKER) == [proc.pid]
    killed = stop_pids([proc.pid], lambda pid: proc.poll() is None)
    assert killed == []
    assert proc.wait(timeout=5) == -15


def test_stop_pids_kills_a_process_that_ignores_sigterm(
    reap: list[subprocess.Popen[bytes]],
) -> None:
    proc = spawn(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    )
    reap.append(proc)
    killed = stop_pids([proc.pid], lambda pid: proc.poll() is None, grace_seconds=0.5)
    assert killed == [proc.pid]
    assert proc.wait(timeout=5) == -9


def test_stop_pids_never_signals_a_process_that_is_not_ours(
    reap: list[subprocess.Popen[bytes]],
) -> None:
    proc = spawn("import time; time.sleep(60)")
    reap.append(proc)
    stop_pids([proc.pid], lambda pid: False, grace_seconds=0.1)
    assert proc.poll() is None


def test_is_ours_checks_the_command_line(reap: list[subprocess.Popen[bytes]]) -> None:
    proc = spawn("import time; time.sleep(60)")
    reap.append(proc)
    assert alive_and_ours(proc.pid)
    assert not is_ours(proc.pid, "--marker=someone-else")
    proc.kill()
    proc.wait()
    assert process_cmdline(proc.pid) is None
    assert not alive_and_ours(proc.pid)


def test_read_pid_files(tmp_path: Path) -> None:
    (tmp_path / "etcd.pid").write_text("123\n")
    (tmp_path / "kube-apiserver.pid").write_text("456")
    (tmp_path / "broken.pid").write_text("not a pid")
    (tmp_path / "notes.txt").write_text("789")
    assert [(p.component, p.pid) for p in read_pid_files(tmp_path)] == [
        ("etcd", 123),
        ("kube-apiserver", 456),
    ]
    assert read_pid_files(tmp_path / "missing") == []


def test_exited_means_gone_or_a_zombie_not_a_blank_command_line() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert not exited(proc.pid)
        proc.kill()
        deadline = time.monotonic() + 5
        while not exited(proc.pid):  # a zombie until reaped: its sockets are closed by then
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.wait()
    assert exited(proc.pid)
