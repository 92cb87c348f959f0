"""The inner-flow hash (dataplane/flows.py) that picks a flow's outer source port,
and the sockets that send from those ports (dataplane/io/sockets.SourcePorts)."""

from __future__ import annotations

import socket
import struct

import pytest

from dataplane.flows import flow_hash, inner_flow_hash, source_index
from dataplane.io.queues import steering_queue
from dataplane.io.sockets import SourcePorts
from dataplane.trace import Tracer


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, frag: int = 0, ihl: int = 5) -> bytes:
    options = b"\x01" * (ihl * 4 - 20)  # NOPs
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), 1, frag, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    return header + options + payload


def tcp(src: str, sport: int, dst: str, dport: int, **kw: int) -> bytes:
    return ipv4(src, dst, 6, struct.pack("!HH", sport, dport) + b"\0" * 16, **kw)


def test_a_flow_and_its_reply_hash_alike() -> None:
    out = tcp("10.244.1.2", 40000, "10.244.2.3", 5201)
    back = tcp("10.244.2.3", 5201, "10.244.1.2", 40000)
    assert inner_flow_hash(out, 0, len(out)) == inner_flow_hash(back, 0, len(back))


def test_the_hash_is_flow_hash_of_addresses_and_ports() -> None:
    """Byte vector: 10.244.1.2:40000 → 10.244.2.3:5201."""
    pkt = tcp("10.244.1.2", 40000, "10.244.2.3", 5201)
    want = flow_hash(0x0AF40102 ^ 0x0AF40203, 40000 ^ 5201)
    assert inner_flow_hash(pkt, 0, len(pkt)) == want
    # at an offset (a TAP's frame: the IP header after 14 bytes of Ethernet)
    frame = b"\xaa" * 14 + pkt
    assert inner_flow_hash(frame, 14, len(frame)) == want


def test_it_agrees_with_the_queue_steering_model() -> None:
    """One hash for both uses: hash % queues is the queue the kernel-checked model
    (queues.steering_queue, compared with the kernel's choice in test_queues) picks."""
    for sport in range(40000, 40064, 2):
        pkt = tcp("10.244.1.2", sport, "10.244.2.3", 5201, ihl=6)
        for queues in (2, 3, 4):
            assert inner_flow_hash(pkt, 0, len(pkt)) % queues == steering_queue(pkt, 0, queues)


def test_ports_count_only_for_protocols_that_have_them_and_not_in_fragments() -> None:
    addresses = flow_hash(0x0AF40102 ^ 0x0AF40203, 0)
    icmp = ipv4("10.244.1.2", "10.244.2.3", 1, b"\x08\x00\x12\x34" + b"\0" * 60)
    assert inner_flow_hash(icmp, 0, len(icmp)) == addresses
    first = tcp("10.244.1.2", 40000, "10.244.2.3", 5201, frag=0x2000)  # MF
    later = ipv4("10.244.1.2", "10.244.2.3", 6, b"\x99" * 40, frag=185)  # offset, no MF
    # Every piece of one datagram gets the same hash, as from the kernel.
    assert inner_flow_hash(first, 0, len(first)) == addresses
    assert inner_flow_hash(later, 0, len(later)) == addresses
    udp = ipv4("10.244.1.2", "10.244.2.3", 17, struct.pack("!HH", 53, 53) + b"\0" * 4)
    assert inner_flow_hash(udp, 0, len(udp)) == flow_hash(0x0AF40102 ^ 0x0AF40203, 0)
    udp2 = ipv4("10.244.1.2", "10.244.2.3", 17, struct.pack("!HH", 5353, 53) + b"\0" * 4)
    assert inner_flow_hash(udp2, 0, len(udp2)) != inner_flow_hash(udp, 0, len(udp))


@pytest.mark.parametrize(
    "packet",
    [b"", b"\x45" * 19, b"\x60" + b"\0" * 59, tcp("10.0.0.1", 1, "10.0.0.2", 2)[:22]],
    ids=["empty", "short", "ipv6", "ports cut off"],
)
def test_what_is_not_a_whole_ipv4_header_hashes_without_raising(packet: bytes) -> None:
    value = inner_flow_hash(packet, 0, len(packet))
    assert 0 <= value < 1 << 32
    if packet[:1] != b"\x45":
        assert value == 0


def test_flows_spread_over_the_ports() -> None:
    """connect() hands out client ports of one parity; 64 such flows use most of 16
    ports, and source_index stays in range at the ends of the hash."""
    used = {
        source_index(inner_flow_hash(p, 0, len(p)), 16)
        for p in (tcp("10.244.1.2", sp, "10.244.2.3", 5201) for sp in range(40000, 40128, 2))
    }
    assert len(used) >= 12 and used <= set(range(16))
    assert source_index(0, 16) == 0 and source_index(0xFFFFFFFF, 16) == 15
    assert source_index(0xFFFFFFFF, 1) == 0


def test_source_ports_are_distinct_bound_sockets_that_take_nothing_in() -> None:
    ports = SourcePorts("127.0.0.1", 4)
    try:
        assert len(set(ports.ports)) == 4 and all(p > 0 for p in ports.ports)
        for sock, port in zip(ports.sockets, ports.ports, strict=True):
            assert sock.getsockname() == ("127.0.0.1", port)
        # A datagram sent from one of them leaves from its port ...
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
            rx.bind(("127.0.0.1", 0))
            rx.settimeout(5)
            ports.sockets[2].sendto(b"hello", rx.getsockname())
            data, source = rx.recvfrom(100)
            assert data == b"hello" and source == ("127.0.0.1", ports.ports[2])
            # ... and one sent to it is not kept (the filter keeps no byte).
            rx.sendto(b"stray", ("127.0.0.1", ports.ports[2]))
            rx.sendto(b"sync", rx.getsockname())
            assert rx.recvfrom(100)[0] == b"sync"
        with pytest.raises(BlockingIOError):
            ports.sockets[2].recv(100)
        pkt = tcp("10.244.1.2", 40000, "10.244.2.3", 5201)
        assert ports.index(pkt, 0, len(pkt)) == source_index(inner_flow_hash(pkt, 0, 40), 4)
    finally:
        ports.close()
    assert ports.sockets == []


def test_the_trace_shows_the_flow_s_source_port() -> None:
    """A traced datagram's outer header carries the port the flow leaves from."""
    from ipaddress import IPv4Address, IPv4Network

    from dataplane.backends.vxlan import VxlanBackend
    from dataplane.forwarder import Forwarder
    from dataplane.peers import Peer
    from dataplane.trace import Subscription, TraceFilter

    backend = VxlanBackend(1, bytes.fromhex("027700000001"))
    fwd = Forwarder(backend)
    fwd.add_peer(
        Peer(IPv4Network("10.244.2.0/24"), IPv4Address("192.168.77.12"),
             vtep_mac=bytes.fromhex("027700000002"), port=8472)
    )  # fmt: skip
    ports = SourcePorts("127.0.0.1", 8)
    try:
        tracer = Tracer(
            "vxlan", local_ip=IPv4Address("192.168.77.11"), local_mac=b"\x02" * 6,
            port=8472, l2_device=False, clock=lambda: 1.0,
        )  # fmt: skip
        tracer.source_ports = ports
        sub = tracer.subscribe(Subscription(TraceFilter.parse("")))
        buf = bytearray(backend.headroom) + bytearray(tcp("10.244.1.2", 40000, "10.244.2.3", 80))
        head = backend.headroom
        verdict = fwd.from_device(buf, head, len(buf))
        tracer.from_device(buf, head, len(buf), verdict, fwd)
        frame = bytes.fromhex(sub.events[0]["frame"])
        sport, dport = struct.unpack_from("!HH", frame, 14 + 20)
        assert dport == 8472
        assert sport == ports.ports[ports.index(buf, head, len(buf))]
    finally:
        ports.close()
