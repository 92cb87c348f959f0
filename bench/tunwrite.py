"""What a TCP super-packet's delivery into a TUN costs, written whole or a segment at
a time (decisions §35).

weft's receive path merges a GRO message's segments and writes them to the pod
device as one GSO packet (NEEDS_CSUM), after checking every segment's TCP checksum
with numpy. The alternative measured here leaves both to the kernel: each segment
written on its own to a TUN opened with IFF_NAPI, whose GRO (with a
gro_flush_timeout) merges them and checks their checksums in C. One write a segment
costs a system call and an skb each; this tool says how much, on this machine.

In a namespace of its own (nothing leaves it: the packets are routed to a veth
whose peer drops them, their MAC being no one's), it writes ROUNDS batches of
SEGMENTS contiguous 1440-byte TCP segments of one flow:

* ``merged`` — one GSO write per batch (a plain TUN, as weft's pod device);
* ``segments`` — one write per segment, IFF_NAPI, gro_flush_timeout FLUSH_US.

Reported: CPU (the writing thread's, which includes the softirq work the writes
start) and wall time per batch, and how many packets left the TUN (GRO merging
shows as fewer than segments written).

    python -m bench.tunwrite [--segments 44] [--rounds 2000] [--flush-us 20]
"""

from __future__ import annotations

import argparse
import os
import struct
import time
from dataclasses import dataclass

from control.lab.netns import in_netns
from control.lab.topology import Lab
from dataplane.io import tun
from dataplane.packet.checksum import internet_checksum, pseudo_header_sum_v4
from dataplane.packet.ipv4 import IP_DF, build_ipv4
from dataplane.packet.vnet import VNET_STRUCT, GsoType, VnetFlag

SRC, DST = "10.244.2.5", "10.244.1.5"
PAYLOAD = 1440
TCP = struct.Struct("!HHIIBBHHH")  # ports, seq, ack, offset, flags, window, csum, urg
VNET_LEN = 12  # weft's pod device: struct virtio_net_hdr_mrg_rxbuf
TSO = 0x01 | 0x02 | 0x04  # TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6


def tcp_segment(seq: int, ip_id: int, payload: bytes) -> bytes:
    """An IPv4 TCP segment (ACK set, DF) with correct checksums."""
    src, dst = bytes(map(int, SRC.split("."))), bytes(map(int, DST.split(".")))
    length = TCP.size + len(payload)
    head = TCP.pack(40000, 5201, seq, 1, 5 << 4, 0x10, 65535, 0, 0)
    csum = internet_checksum(head + payload, pseudo_header_sum_v4(src, dst, 6, length))
    head = head[:16] + struct.pack("!H", csum) + head[18:]
    return build_ipv4(SRC, DST, 6, head + payload, identification=ip_id, flags=IP_DF)


def merged_packet(count: int, payload: bytes) -> tuple[bytes, bytes]:
    """(vnet header, packet): `count` segments as one TCP GSO packet whose checksum
    field holds the pseudo-header sum, as weft writes them."""
    src, dst = bytes(map(int, SRC.split("."))), bytes(map(int, DST.split(".")))
    body = payload * count
    head = TCP.pack(40000, 5201, 1000, 1, 5 << 4, 0x10, 65535, 0, 0)
    pseudo = pseudo_header_sum_v4(src, dst, 6, TCP.size + len(body))
    head = head[:16] + struct.pack("!H", pseudo) + head[18:]
    packet = build_ipv4(SRC, DST, 6, head + body, flags=IP_DF)
    flags, gso = int(VnetFlag.NEEDS_CSUM), int(GsoType.TCPV4)
    vnet = VNET_STRUCT.pack(flags, gso, 40, len(payload), 20, 16) + bytes(2)
    return vnet, packet


@dataclass(frozen=True)
class Result:
    way: str
    cpu_us: float  # per batch
    wall_us: float
    packets_out: int  # packets that left the TUN (routed on)
    written: int  # segments written


def _tx_packets(lab: Lab, ns: str, dev: str) -> int:
    return int(lab.link_stats(ns, dev)[dev]["tx"]["packets"])


def run_one(lab: Lab, way: str, segments: int, rounds: int, flush_us: int) -> Result:
    ns = lab.add_netns(way[:3])
    lab.ip(ns, "link", "add", "out0", "type", "veth", "peer", "name", "out1")
    for dev in ("out0", "out1"):
        lab.ip(ns, "link", "set", dev, "up")
    lab.ip(ns, "addr", "add", "192.0.2.1/24", "dev", "out0")
    lab.ip(ns, "neigh", "add", "192.0.2.2", "lladdr", "02:00:00:00:00:02", "dev", "out0")
    lab.run(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    with in_netns(ns):
        dev = tun.open_tun("tw%d", vnet_hdr=True, napi=way == "segments")
    try:
        tun.set_offload(dev, TSO)
        tun.set_vnet_hdr_size(dev, VNET_LEN)
        lab.ip(ns, "link", "set", dev.name, "up")
        lab.run(ns, "sysctl", "-q", "-w", f"net.ipv4.conf.{dev.name}.rp_filter=0")
        lab.ip(ns, "route", "add", "10.244.1.0/24", "via", "192.0.2.2", "dev", "out0")
        if way == "segments":
            # (`ip netns exec` mounts the namespace's own /sys)
            knob = f"/sys/class/net/{dev.name}/gro_flush_timeout"
            lab.run(ns, "sh", "-c", f"echo {flush_us * 1000} > {knob}")
        fd = dev.fileno()
        os.set_blocking(fd, True)
        payload = (bytes(range(256)) * 6)[:PAYLOAD]
        before = _tx_packets(lab, ns, "out0")
        if way == "merged":
            vnet, packet = merged_packet(segments, payload)
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            for _ in range(rounds):
                os.writev(fd, [vnet, packet])
        else:
            # Four batches of sequence numbers with a gap between them, reused: GRO
            # merges within a batch and flushes at the gap to the next, as for
            # super-packets a segment apart.
            vnet = bytes(VNET_LEN)
            pkts = [
                vnet + tcp_segment(1000 + (b * (segments + 1) + i) * PAYLOAD, i, payload)
                for b in range(4)
                for i in range(segments)
            ]
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            for r in range(rounds):
                base = (r % 4) * segments
                for i in range(base, base + segments):
                    os.write(fd, pkts[i])
        c1, w1 = time.thread_time_ns(), time.perf_counter_ns()
        time.sleep(0.05)  # (the last batch's GRO flush)
        out = _tx_packets(lab, ns, "out0") - before
    finally:
        dev.close()
    return Result(way, (c1 - c0) / rounds / 1e3, (w1 - w0) / rounds / 1e3, out, segments * rounds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.tunwrite", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--segments", type=int, default=44, help="segments a batch (default 44)")
    p.add_argument("--rounds", type=int, default=2000, help="batches (default 2000)")
    p.add_argument("--flush-us", type=int, default=20, help="the TUN's gro_flush_timeout, µs")
    args = p.parse_args(argv)
    if not 1 <= args.segments <= 44 or args.rounds < 1 or args.flush_us < 0:
        p.error("--segments 1..44, --rounds ≥ 1, --flush-us ≥ 0")
    with Lab() as lab:
        for way in ("merged", "segments"):
            r = run_one(lab, way, args.segments, args.rounds, args.flush_us)
            print(
                f"{r.way:<9} {r.cpu_us:8.1f} µs CPU a batch of {args.segments} "
                f"({r.cpu_us / args.segments:.2f} a segment), wall {r.wall_us:.1f} µs; "
                f"{r.packets_out} packets left the TUN for {r.written} segments written"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
