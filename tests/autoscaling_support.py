"""Load for the autoscaling tests and benchmark: closed-loop clients of the ``slow`` model."""

from __future__ import annotations

import json
import time

from triton_support import Sidecar, Traffic


def slow_request(delay: float = 0.4) -> bytes:
    """A request the ``slow`` test model answers after ``delay`` seconds."""
    return json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0.0]},
                {"name": "delay", "shape": [1, 1], "datatype": "FP32", "data": [delay]},
            ]
        }
    ).encode()


class Load:
    """``clients`` closed-loop clients spread over the sidecars: about that many requests
    are in flight at any time."""

    def __init__(self, sidecars: list[Sidecar], clients: int, delay: float = 0.4) -> None:
        body = slow_request(delay)
        self.clients = [
            Traffic(sidecars[i % len(sidecars)], "slow", lambda: body) for i in range(clients)
        ]
        self.started = time.monotonic()

    def stop(self) -> float:
        """Stop every client at once; returns when they were told (the load starts falling
        then), after they all stopped."""
        for client in self.clients:
            client.signal()
        told = time.monotonic()
        for client in self.clients:
            client.stop()
        return told
