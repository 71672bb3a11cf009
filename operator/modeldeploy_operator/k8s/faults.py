"""Test-only fault points.

The operator dies between two of its writes:

``MODELDEPLOY_CRASH_AFTER_WRITES=N`` (or the hidden flag ``--crash-after-writes``) arms it:
the process exits, as if SIGKILLed, when it is about to send its (N+1)th write, so write N
reached the API server and nothing after it did. Tests run a rollout through a chain of such
processes (each one write further) and check it ends exactly where an undisturbed one does.
Unarmed, it is not in the request path at all.

kopf's watch of ModelDeployments goes elsewhere: the hidden flag ``--watch-server=URL`` sends
kopf's connection (only) to another address with the same credentials, a relay that delays
what the API server sends (``localcluster.faultproxy``), so that one watch runs behind while
the operator's own client does not.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import replace

from modeldeploy_operator.k8s.client import Connection

CRASH_EXIT_CODE = 86
ENVIRONMENT = "MODELDEPLOY_CRASH_AFTER_WRITES"


class CrashAfterWrites:
    """A ``may_write`` hook (see ``leader.elector.LeaderOnlyApi``) that lets ``writes`` writes
    through and ends the process at the next one."""

    def __init__(self, writes: int, die: Callable[[int], object] = os._exit) -> None:
        if writes < 0:
            raise ValueError(f"{ENVIRONMENT} must be 0 or more, got {writes}")
        self.writes = writes
        self.sent = 0
        self._die = die
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        with self._lock:
            if self.sent >= self.writes:
                # Which write it stopped before, for the test's log: the act layer's caller.
                frames = [
                    f for f in traceback.extract_stack() if "modeldeploy_operator" in f.filename
                ]
                where = " < ".join(f"{f.name}:{f.lineno}" for f in reversed(frames[-4:-1]))
                print(f"crash point: before write {self.sent + 1} ({where})", file=sys.stderr)
                sys.stderr.flush()
                self._die(CRASH_EXIT_CODE)
            self.sent += 1
        return True


def watch_connection(connection: Connection, server: str | None) -> Connection:
    """kopf's connection: the operator's, or the same login to ``server`` (--watch-server)."""
    return connection if server is None else replace(connection, server=server)
