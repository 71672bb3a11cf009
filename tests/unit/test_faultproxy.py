"""The fault relay the API-fault tests put between the operator and the API server, against a
local echo server: bytes pass, a stall holds everything (the end of the stream too), a
partition holds new connections, a reset closes, and the kubeconfig it writes points at it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from localcluster.faultproxy import FaultProxy, upstream_of


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    """Echoes what it gets; closes a connection when its client sends ``bye``."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                if data == b"bye":
                    return
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()
    listener.close()


@pytest.fixture
def relay(echo: tuple[str, int]) -> Iterator[FaultProxy]:
    proxy = FaultProxy(echo).start()
    yield proxy
    proxy.close()


def connect(proxy: FaultProxy) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=1)
    conn.settimeout(0.5)
    return conn


def test_bytes_pass_both_ways(relay: FaultProxy) -> None:
    with connect(relay) as conn:
        conn.sendall(b"hello")
        assert conn.recv(100) == b"hello"
    assert relay.accepted == 1


def test_a_stall_silences_open_connections_even_their_end_and_lets_new_ones_pass(
    relay: FaultProxy,
) -> None:
    held = connect(relay)
    held.sendall(b"one")
    assert held.recv(100) == b"one"
    relay.stall()
    held.sendall(b"two")
    with pytest.raises(TimeoutError):
        held.recv(100)
    held.sendall(b"bye")  # the server closes: the client must not learn it
    with pytest.raises(TimeoutError):
        held.recv(100)
    with connect(relay) as fresh:
        fresh.sendall(b"three")
        assert fresh.recv(100) == b"three"
    held.close()


def test_a_partition_holds_new_connections_until_healed(relay: FaultProxy) -> None:
    relay.partition()
    with connect(relay) as cut:  # accepted, never answered
        cut.sendall(b"lost")
        with pytest.raises(TimeoutError):
            cut.recv(100)
    relay.heal()
    with connect(relay) as fresh:
        fresh.sendall(b"back")
        assert fresh.recv(100) == b"back"


def test_a_reset_closes_every_open_connection(relay: FaultProxy) -> None:
    with connect(relay) as conn:
        conn.sendall(b"x")
        assert conn.recv(100) == b"x"
        relay.reset()
        with contextlib.suppress(ConnectionResetError):  # linger 0: an RST
            assert conn.recv(100) == b""


def test_the_kubeconfig_points_every_cluster_at_the_relay(
    relay: FaultProxy, tmp_path: Path
) -> None:
    source = tmp_path / "kubeconfig"
    source.write_text(
        yaml.safe_dump(
            {"clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}]}
        )
    )
    target = relay.kubeconfig(source, tmp_path / "through")
    assert upstream_of(source) == ("127.0.0.1", 6443)
    assert upstream_of(target) == ("127.0.0.1", relay.port)


def test_a_lag_delays_what_the_server_sends_in_order_and_can_end(relay: FaultProxy) -> None:
    with connect(relay) as conn:
        relay.lag(1.0)
        sent = time.monotonic()
        conn.sendall(b"one")
        with pytest.raises(TimeoutError):
            conn.recv(100)  # 0.5 s: not yet
        conn.settimeout(2)
        got = b""
        while len(got) < 3:
            got += conn.recv(100)
        assert got == b"one"
        assert time.monotonic() - sent >= 1.0
        relay.lag(0)
        conn.sendall(b"two")
        assert conn.recv(100) == b"two"
