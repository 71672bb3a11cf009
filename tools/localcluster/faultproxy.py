"""A TCP relay between one client (an operator) and the API server, which a test can break.

The bytes pass through untouched (TLS end to end: the API server's certificate names
127.0.0.1), so every fault is one the network makes, never a made-up HTTP answer:

- ``stall()``: every open connection goes silent in both directions and stays silent (a
  middlebox that lost its state, a half-dead HTTP/2 stream); new connections pass.
- ``partition()``: as ``stall()``, and new connections are accepted but never connected
  upstream: nothing the client sends arrives, nothing comes back.
- ``heal()``: new connections pass again (the silenced ones stay dead; the client must notice).
- ``reset()``: every open connection is closed at once (RST), as an API server restart does.
- ``lag(seconds)``: what the API server sends reaches the client ``seconds`` late, in order,
  on every connection (a watch that runs behind); what the client sends passes at once.

It runs an asyncio loop in a daemon thread; ``close()`` ends it and every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

CHUNK = 64 * 1024


@dataclass(eq=False)  # by identity: links live in a set
class _Link:
    """One client connection and its upstream twin."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    flowing: asyncio.Event = field(default_factory=asyncio.Event)


class FaultProxy:
    """``FaultProxy(("127.0.0.1", 6443)).start()`` listens on a free port of 127.0.0.1."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.accepted = 0  # connections, for tests that want to see traffic went through
        self._links: set[_Link] = set()
        self._partitioned = False
        self._lag = 0.0  # seconds the API server's bytes wait before the client gets them
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def close(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def stall(self) -> None:
        self._call(self._silence())

    def partition(self) -> None:
        self._partitioned = True
        self._call(self._silence())

    def heal(self) -> None:
        self._partitioned = False
        self._lag = 0.0  # seconds the API server's bytes wait before the client gets them

    def reset(self) -> None:
        self._call(self._reset())

    def lag(self, seconds: float) -> None:
        """From now on, hold what the API server sends for ``seconds`` (0: no more)."""
        self._lag = seconds

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kubeconfig(self, source: Path, target: Path) -> Path:
        """A copy of ``source`` whose every cluster's server is this proxy."""
        config: dict[str, Any] = yaml.safe_load(source.read_text())
        for cluster in config.get("clusters", []):
            server = urlsplit(cluster["cluster"]["server"])
            cluster["cluster"]["server"] = server._replace(netloc=self.address).geturl()
        target.write_text(yaml.safe_dump(config))
        return target

    # -- on the loop ---------------------------------------------------------------------

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(client=writer)
        self._links.add(link)
        try:
            if self._partitioned:
                await asyncio.Event().wait()  # held: never connected, never answered
            up_reader, link.upstream = await asyncio.open_connection(*self.upstream)
            link.flowing.set()
            await asyncio.gather(
                self._pump(reader, link.upstream, link),
                self._pump(up_reader, writer, link, lambda: self._lag),
            )
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # cancelled: close() ends the relay (re-raising only logs noise)
        finally:
            self._links.discard(link)
            for end in (writer, link.upstream):
                if end is not None:
                    end.close()

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        link: _Link,
        lag: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """Copy one direction, each chunk ``lag()`` seconds after it came (the lag when it
        came), in order. A stall holds everything that comes while it lasts: data, the end of
        the stream, a reset; none reaches the other side."""
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await held.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await link.flowing.wait()
                if not data:
                    with contextlib.suppress(OSError):
                        sink.write_eof()
                    return
                sink.write(data)
                await sink.drain()

        delivering = asyncio.ensure_future(deliver())
        try:
            while True:
                await link.flowing.wait()
                try:
                    data = await source.read(CHUNK)
                except OSError:
                    await link.flowing.wait()
                    raise
                await link.flowing.wait()
                held.put_nowait((loop.time() + lag(), data))
                if not data:
                    break
            await delivering
        finally:
            delivering.cancel()

    async def _silence(self) -> None:
        for link in self._links:
            link.flowing.clear()

    async def _reset(self) -> None:
        for link in list(self._links):
            for end in (link.client, link.upstream):
                if end is None:
                    continue
                sock = end.get_extra_info("socket")
                if isinstance(sock, socket.socket):  # linger 0: close sends RST
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                end.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def upstream_of(kubeconfig: Path) -> tuple[str, int]:
    """The (host, port) of the first cluster's server in ``kubeconfig``."""
    config = yaml.safe_load(kubeconfig.read_text())
    server = urlsplit(config["clusters"][0]["cluster"]["server"])
    return server.hostname or "127.0.0.1", server.port or 443
