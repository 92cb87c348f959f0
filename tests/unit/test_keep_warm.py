"""--keep-warm: idle.KeepWarm decides from the engine's packet counts when to run a warm
pass, and the real Engine's warm pass moves nothing, counts nothing but itself, and
stops once the node has been idle for longer than the hold.

The engine is bench.trace_cost's loopback one: a datagram socketpair as the device and
a UDP socket on 127.0.0.1 towards a sink, with one peer (10.244.2.0/24)."""

from __future__ import annotations

import asyncio
import time
from ipaddress import IPv4Network

import pytest
import uvloop
from loopback_helpers import Loopback, received

from dataplane.io import idle
from dataplane.io.idle import WARM_HOLD_NS, WARM_LOOK_NS, IdleGaps, KeepWarm, warm_datagram
from dataplane.packet.ipv4 import build_ipv4, parse_ipv4
from dataplane.peers import Peer

MS = 1_000_000
PERIOD = 2 * MS


def test_no_pass_before_any_traffic_and_a_slow_look_meanwhile() -> None:
    warm = KeepWarm(PERIOD)
    assert warm.tick(10 * MS, 0) == (False, WARM_LOOK_NS)
    assert warm.tick(10_000 * MS, 0) == (False, WARM_LOOK_NS)


def test_passes_while_traffic_is_sporadic_and_not_while_it_flows() -> None:
    warm = KeepWarm(PERIOD)
    t = 1000 * MS
    assert warm.tick(t, 5) == (False, PERIOD)  # packets since the last tick: warm already
    assert warm.tick(t + PERIOD, 5) == (True, PERIOD)  # none since: a pass
    assert warm.tick(t + 2 * PERIOD, 5) == (True, PERIOD)
    assert warm.tick(t + 3 * PERIOD, 9) == (False, PERIOD)  # traffic again
    for k in range(4, 100):
        assert warm.tick(t + k * PERIOD, 9 + k) == (False, PERIOD)  # a steady flow


def test_after_the_hold_the_timer_only_looks_and_traffic_brings_it_back() -> None:
    warm = KeepWarm(PERIOD)
    t = 1000 * MS
    warm.tick(t, 1)
    assert warm.tick(t + WARM_HOLD_NS - 1, 1) == (True, PERIOD)
    assert warm.tick(t + WARM_HOLD_NS, 1) == (False, WARM_LOOK_NS)
    assert warm.tick(t + 50 * WARM_HOLD_NS, 1) == (False, WARM_LOOK_NS)
    later = t + 51 * WARM_HOLD_NS
    assert warm.tick(later, 2) == (False, PERIOD)
    assert warm.tick(later + PERIOD, 2) == (True, PERIOD)


def test_the_made_up_datagram_is_a_valid_ipv4_udp_header() -> None:
    data = warm_datagram(bytes((10, 244, 2, 0)))
    ip, payload = parse_ipv4(data)
    assert (ip.total_length, ip.protocol, ip.ttl, str(ip.dst)) == (28, 17, 64, "10.244.2.0")
    assert len(data) == 28 and bytes(payload) == bytes((0, 9, 0, 9, 0, 8, 0, 0))


def test_idle_gaps_come_back_as_they_were() -> None:
    gaps = IdleGaps()
    gaps.device_done(5, True)
    gaps.network_done(7, False)
    state = gaps.state()
    gaps.device_done(100, False)
    gaps.network_done(200, True)
    gaps.restore(state)
    assert gaps.state() == (5, True, 7, False)


def test_the_engine_warms_while_traffic_is_sporadic_and_moves_nothing(
    loopback: Loopback, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, feeder, sink = loopback.engine, loopback.feeder, loopback.sink
    monkeypatch.setattr(idle, "WARM_HOLD_NS", 300 * MS)
    monkeypatch.setattr(idle, "WARM_LOOK_NS", 50 * MS)
    engine.keep_warm_ns = 1 * MS
    counters = engine.forwarder.counters
    packet = build_ipv4("10.244.1.2", "10.244.2.2", 17, bytes(100), ttl=64)

    async def wait_for(what, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while not what():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    async def scenario() -> dict[str, int]:
        engine.start(asyncio.get_running_loop())
        try:
            await asyncio.sleep(0.1)
            passes_before = counters.warm_passes  # none: no traffic seen yet
            for _ in range(3):
                feeder.send(packet)
                await wait_for(lambda n=counters.warm_passes: counters.warm_passes >= n + 5)
            await asyncio.sleep(0.6)  # past the hold: no pass can come now
            stopped = counters.warm_passes
            await asyncio.sleep(0.3)
            return {
                "passes_before": passes_before,
                "sent": received(sink),
                "passes_after_hold": counters.warm_passes - stopped,
                "tx_packets": counters.tx_packets,
                "wakeups": counters.batches[0] + counters.batches[1],
                "packets": counters.batch_packets[0] + counters.batch_packets[1],
                "passes": counters.warm_passes,
            }
        finally:
            engine.stop()

    result = uvloop.run(scenario())
    assert result["passes_before"] == 0 and result["passes"] >= 15
    # Only the three real packets count: sent, taken in (at most) three wake-ups.
    assert result["sent"] == result["tx_packets"] == result["packets"] == 3
    assert result["wakeups"] <= 3
    assert result["passes_after_hold"] == 0
    assert engine._warm_counters.tx_packets >= 15  # the made-up packets, counted apart


def test_the_made_up_packet_follows_the_peers(loopback: Loopback) -> None:
    """It goes to a peer that is there (a removed one's subnet is not warmed towards,
    nothing is dropped for it), and never counts in the node's counters."""
    engine, fwd = loopback.engine, loopback.engine.forwarder
    engine.warm_pass()
    assert engine._warm_counters.tx_packets == 1 and engine._warm_dst == bytes((10, 244, 2, 0))
    [peer] = fwd.peers()
    fwd.remove_peer(peer.subnet)
    engine.warm_pass()
    assert engine._warm_counters.tx_packets == 1 and engine._warm_dst is None
    fwd.add_peer(Peer(IPv4Network("10.244.3.0/24"), peer.public_ip, peer.vtep_mac, peer.port))
    engine.warm_pass()
    assert engine._warm_counters.tx_packets == 2 and engine._warm_dst == bytes((10, 244, 3, 0))
    c = fwd.counters
    assert (c.tx_packets, c.drop_counts(), c.batches, c.warm_passes) == (0, {}, [0, 0], 3)
    assert received(loopback.sink) == 0
