"""``/healthz``: answers 200 while the operator can do its work, 500 with the reason when not.

Our own endpoint rather than kopf's: it must answer on a standby replica too (kopf starts
only once the Lease is held), and it must fail when reconciles are stuck, not only when the
process is gone. The check is a callable that returns the reason it is unhealthy, or None.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Check = Callable[[], str | None]


class HealthServer:
    """Serves ``GET /healthz`` from a daemon thread, like prometheus_client's exporter."""

    def __init__(self, address: str, port: int, check: Check) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/healthz":
                    self._answer(404, "not found")
                    return
                try:
                    problem = check()
                except Exception as error:  # a check that fails is a failed check
                    problem = f"health check failed: {error}"
                self._answer(200 if problem is None else 500, problem or "ok")

            def _answer(self, code: int, text: str) -> None:
                body = (text + "\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:  # probes every few seconds: no logs
                return

        self._server = ThreadingHTTPServer((address, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="healthz", daemon=True
        )

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
