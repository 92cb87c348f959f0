"""What tracing costs the engine's device loop: off, armed with no reader, and with one.

The real `Engine._on_device` drains a socketpair standing in for the TUN device
(a datagram socket reads one packet per call, as a TUN does) and sends the
encapsulated result to a UDP socket on 127.0.0.1 that never reads (the kernel
drops what overflows). Three variants in the same process, interleaved over
rounds: the tracer hook absent (`engine.tracer = None`), a Tracer with nobody
listening (what every weft node runs), and a Tracer with one subscriber taking
every packet (sampling 1, no rate limit) — the last is what `weft trace live`
costs while it runs.
"""

from __future__ import annotations

import socket
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from dataplane.backends.vxlan import VxlanBackend
from dataplane.forwarder import Forwarder
from dataplane.io.runner import BATCH, Engine
from dataplane.packet.ipv4 import build_ipv4
from dataplane.peers import Peer
from dataplane.trace import Subscription, TraceFilter, Tracer

MAC_A = bytes.fromhex("027700000001")
MAC_B = bytes.fromhex("027700000002")


def loopback_engine() -> tuple[Engine, socket.socket, list[socket.socket]]:
    """The real Engine between a datagram socketpair (the device; packets go in through
    the returned feeder) and a UDP socket that sends to a sink on 127.0.0.1, with one
    peer (10.244.2.0/24) at that sink. Also returns [sink, sender, device, feeder]."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setblocking(False)
    device, feeder = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    device.setblocking(False)
    fwd = Forwarder(VxlanBackend(1, MAC_A), local_ip=IPv4Address("10.244.1.0"))
    fwd.add_peer(
        Peer(IPv4Network("10.244.2.0/24"), IPv4Address("127.0.0.1"), MAC_B, sink.getsockname()[1])
    )
    engine = Engine(fwd, device.fileno(), sender)
    return engine, feeder, [sink, sender, device, feeder]


def _tracer(subscribed: bool) -> Tracer:
    tracer = Tracer(
        "vxlan",
        local_ip=IPv4Address("127.0.0.1"),
        local_mac=MAC_A,
        port=8472,
        l2_device=False,
        clock=time.time,
    )
    if subscribed:
        tracer.subscribe(Subscription(TraceFilter(), max_rate=1e12, maxlen=1 << 30))
    return tracer


def run(batches: int = 2000, rounds: int = 5, size: int = 1400) -> dict[str, Any]:
    engine, feeder, sockets = loopback_engine()
    packet = build_ipv4("10.244.1.2", "10.244.2.2", 17, bytes(size - 20), ttl=64)
    variants = {
        "off": None,
        "armed, no reader": _tracer(False),
        "one reader, every packet": _tracer(True),
    }
    best: dict[str, float] = {name: float("inf") for name in variants}
    try:
        for _ in range(rounds):
            for name, tracer in variants.items():
                engine.tracer = tracer
                if tracer is not None:
                    for sub in tracer.subscribers:
                        sub.events.clear()
                elapsed = 0
                for _ in range(batches):
                    for _ in range(BATCH):
                        feeder.send(packet)
                    t0 = time.perf_counter_ns()
                    engine._on_device()
                    elapsed += time.perf_counter_ns() - t0
                best[name] = min(best[name], elapsed / (batches * BATCH))
    finally:
        for s in sockets:
            s.close()
    base = best["off"]
    return {
        "packet_bytes": size,
        "packets_per_round": batches * BATCH,
        "rounds": rounds,
        "ns_per_packet": best,
        "ratio_to_off": {name: ns / base for name, ns in best.items()},
    }


def markdown(res: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Tracing cost in the engine's device loop ({res['packet_bytes']}-byte packets, "
        f"best of {res['rounds']} rounds × {res['packets_per_round']} packets; "
        "read + lookup + encap + sendto):",
        "",
        "| tracer | ns per packet | × off |",
        "|---|---:|---:|",
    ]
    for name, ns in res["ns_per_packet"].items():
        lines.append(f"| {name} | {ns:.0f} | {res['ratio_to_off'][name]:.2f} |")
    return lines
