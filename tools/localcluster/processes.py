"""Processes the local cluster started: found by PID and command line, stopped for sure.

The command line of everything we start names our state folder; that marker guards against
PID reuse (a recycled PID belongs to some other program and is never signalled).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def process_cmdline(pid: int) -> str | None:
    """The command line of a live process, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if not raw:  # a zombie: exited, not yet reaped
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace")


def is_ours(pid: int, marker: str) -> bool:
    """True when ``pid`` is alive and its command line mentions ``marker`` (our state folder).

    The marker guards against PID reuse: a recycled PID belongs to some other program.
    """
    cmdline = process_cmdline(pid)
    return cmdline is not None and marker in cmdline


def exited(pid: int) -> bool:
    """True once the process has finished exiting: gone, or a zombie with no thread left
    (every file it held, sockets too, closed). A process still exiting is neither, though its
    command line reads empty already; and the main thread of a multi-threaded one (any Go
    program) turns zombie while its other threads still hold its files."""
    task = Path(f"/proc/{pid}/task")
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        threads = [t for t in task.iterdir() if t.name != str(pid)]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X") and not threads


def processes_mentioning(marker: str) -> list[int]:
    """Every live process whose command line mentions ``marker``; a leak check."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            cmdline = process_cmdline(int(entry.name))
            if cmdline is not None and marker in cmdline:
                found.append(int(entry.name))
    return found


def stop_pids(
    pids: Iterable[int],
    alive: Callable[[int], bool],
    grace_seconds: float = 10.0,
) -> list[int]:
    """SIGTERM each live pid, SIGKILL what is still alive after the grace period.

    Returns the pids that had to be killed. ``alive`` decides whether a pid is still one of
    ours, so a recycled pid is never signalled.
    """
    remaining = [pid for pid in pids if alive(pid)]
    for pid in remaining:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while remaining and time.monotonic() < deadline:
        time.sleep(0.1)
        remaining = [pid for pid in remaining if alive(pid)]
    for pid in remaining:
        _signal(pid, signal.SIGKILL)
    return remaining


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
