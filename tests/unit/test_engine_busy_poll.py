"""Engine busy polling (--busy-poll): packets still flow, the spin ends after the idle
window, and empty polling rounds are not counted as wake-ups.

The device is a datagram socketpair (one packet per read, as a TUN) and the
underlay a UDP socket on 127.0.0.1: the engine code under test is the real one."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import uvloop

from bench.trace_cost import loopback_engine
from dataplane.io.runner import Engine
from dataplane.packet.ipv4 import build_ipv4


@pytest.fixture
def parts():
    engine, feeder, sockets = loopback_engine()
    sink, sender, device, _ = sockets
    sink.setblocking(False)
    yield engine.forwarder, device, sender, feeder, sink
    for s in sockets:
        s.close()


def _received(sink: socket.socket) -> int:
    n = 0
    while True:
        try:
            sink.recv(2048)
        except BlockingIOError:
            return n
        n += 1


def test_busy_poll_forwards_and_stops_after_the_idle_window(parts) -> None:
    fwd, device, sender, feeder, sink = parts
    packet = build_ipv4("10.244.1.2", "10.244.2.2", 17, bytes(100), ttl=64)
    engine = Engine(fwd, device.fileno(), sender, busy_poll_us=30_000)

    async def scenario() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        engine.start(loop)
        try:
            feeder.send(packet)
            await asyncio.sleep(0.005)
            spinning_after_packet = engine._spin is not None
            # While spinning, a packet is picked up by the polling rounds.
            feeder.send(packet)
            await asyncio.sleep(0.005)
            got_while_spinning = _received(sink)
            deadline = time.monotonic() + 2.0
            while engine._spin is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            stopped = engine._spin is None
            # Asleep in epoll again: the reader still wakes it.
            feeder.send(packet)
            await asyncio.sleep(0.02)
            got_after = _received(sink)
            return {
                "spinning": spinning_after_packet,
                "got_while_spinning": got_while_spinning,
                "stopped": stopped,
                "got_after": got_after,
            }
        finally:
            engine.stop()

    result = uvloop.run(scenario())
    assert result == {
        "spinning": True,
        "got_while_spinning": 2,
        "stopped": True,
        "got_after": 1,
    }
    assert fwd.counters.tx_packets == 3
    # Hundreds of empty rounds ran; only rounds that took a packet count as batches.
    assert fwd.counters.batch_packets[0] == 3
    assert 1 <= fwd.counters.batches[0] <= 3
    assert engine._spin is None


def test_busy_poll_off_never_spins(parts) -> None:
    fwd, device, sender, feeder, sink = parts
    packet = build_ipv4("10.244.1.2", "10.244.2.2", 17, bytes(100), ttl=64)
    engine = Engine(fwd, device.fileno(), sender)

    async def scenario() -> bool:
        engine.start(asyncio.get_running_loop())
        try:
            feeder.send(packet)
            await asyncio.sleep(0.01)
            return engine._spin is None and _received(sink) == 1
        finally:
            engine.stop()

    assert uvloop.run(scenario())
