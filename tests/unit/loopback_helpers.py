"""The loopback engine of the engine unit tests (bench.trace_cost.loopback_engine: a
datagram socketpair as the device, a UDP socket on 127.0.0.1 towards a sink, one peer
10.244.2.0/24 at the sink; the `loopback` fixture in conftest.py), and how many
datagrams reached the sink."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from dataplane.io.runner import Engine


@dataclass
class Loopback:
    engine: Engine
    feeder: socket.socket  # what is sent here, the engine reads from its device
    device: socket.socket
    sender: socket.socket
    sink: socket.socket  # where the peer's datagrams arrive (non-blocking)


def received(sink: socket.socket) -> int:
    """Datagrams waiting at the sink (read and dropped)."""
    n = 0
    while True:
        try:
            sink.recv(2048)
        except BlockingIOError:
            return n
        n += 1
