"""Engine busy polling (--busy-poll): packets still flow, the spin ends after the idle
window, and empty polling rounds are not counted as wake-ups.

The device is a datagram socketpair (one packet per read, as a TUN) and the
underlay a UDP socket on 127.0.0.1: the engine code under test is the real one."""

from __future__ import annotations

import asyncio
import time

import uvloop
from loopback_helpers import Loopback, received

from dataplane.io.runner import Engine
from dataplane.packet.ipv4 import build_ipv4


def test_busy_poll_forwards_and_stops_after_the_idle_window(loopback: Loopback) -> None:
    feeder, sink = loopback.feeder, loopback.sink
    packet = build_ipv4("10.244.1.2", "10.244.2.2", 17, bytes(100), ttl=64)
    engine = Engine(
        loopback.engine.forwarder, loopback.device.fileno(), loopback.sender, busy_poll_us=30_000
    )

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
            got_while_spinning = received(sink)
            deadline = time.monotonic() + 2.0
            while engine._spin is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            stopped = engine._spin is None
            # Asleep in epoll again: the reader still wakes it.
            feeder.send(packet)
            await asyncio.sleep(0.02)
            got_after = received(sink)
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
    assert engine.forwarder.counters.tx_packets == 3
    # Hundreds of empty rounds ran; only rounds that took a packet count as batches.
    assert engine.forwarder.counters.batch_packets[0] == 3
    assert 1 <= engine.forwarder.counters.batches[0] <= 3
    assert engine._spin is None


def test_busy_poll_off_never_spins(loopback: Loopback) -> None:
    feeder, sink = loopback.feeder, loopback.sink
    packet = build_ipv4("10.244.1.2", "10.244.2.2", 17, bytes(100), ttl=64)
    engine = Engine(loopback.engine.forwarder, loopback.device.fileno(), loopback.sender)

    async def scenario() -> bool:
        engine.start(asyncio.get_running_loop())
        try:
            feeder.send(packet)
            await asyncio.sleep(0.01)
            return engine._spin is None and received(sink) == 1
        finally:
            engine.stop()

    assert uvloop.run(scenario())
