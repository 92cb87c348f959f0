"""The sans-I/O forwarder with every backend: byte-level checks, scapy as the independent reader."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from dataplane.backends.base import DropReason
from dataplane.backends.hostgw import HostGwBackend
from dataplane.backends.udp import UdpBackend
from dataplane.backends.vxlan import VxlanBackend
from dataplane.forwarder import Forwarder, Verdict
from dataplane.peers import Peer

OUR_MAC = bytes.fromhex("02aabbccdd01")
PEER_MAC = bytes.fromhex("02aabbccdd02")
PEER = Peer(IPv4Network("10.244.2.0/24"), IPv4Address("192.168.77.11"), PEER_MAC, 8472)
LOCAL = IPv4Address("10.244.1.0")
HEAD = 64


def load(fwd: Forwarder, packet: bytes) -> tuple[bytearray, int, int]:
    buf = bytearray(HEAD + len(packet) + 64)
    buf[HEAD : HEAD + len(packet)] = packet
    return buf, HEAD, HEAD + len(packet)


def ping(dst: str = "10.244.2.5", size: int = 56, df: bool = True, ttl: int = 63) -> bytes:
    flags = "DF" if df else 0
    return bytes(
        IP(src="10.244.1.5", dst=dst, ttl=ttl, flags=flags) / ICMP(id=7, seq=1) / Raw(b"x" * size)
    )


def vxlan_fwd(**kw: object) -> Forwarder:
    fwd = Forwarder(VxlanBackend(1, OUR_MAC), local_ip=LOCAL, **kw)  # type: ignore[arg-type]
    fwd.add_peer(PEER)
    return fwd


def test_vxlan_encap_is_what_the_kernel_expects() -> None:
    fwd = vxlan_fwd()
    packet = ping()
    buf, start, end = load(fwd, packet)
    assert fwd.from_device(buf, start, end) == Verdict.SEND
    assert fwd.out_peer is PEER and PEER.sockaddr == ("192.168.77.11", 8472)
    payload = bytes(buf[fwd.out_start : fwd.out_end])
    assert payload[:8] == bytes.fromhex("0800000000000100")
    vx = VXLAN(payload)
    assert vx.vni == 1 and vx.flags == 0x08
    inner = vx[Ether]
    assert inner.dst == "02:aa:bb:cc:dd:02" and inner.src == "02:aa:bb:cc:dd:01"
    assert inner.type == 0x0800 and bytes(inner.payload) == packet
    assert fwd.counters.tx_packets == 1 and fwd.counters.tx_bytes == len(packet)


def test_vxlan_decap_delivers_the_inner_packet() -> None:
    fwd = vxlan_fwd()
    inner = bytes(IP(src="10.244.2.5", dst="10.244.1.5") / ICMP(type=0))
    frame = bytes(VXLAN(vni=1, flags=0x08) / Ether(dst=OUR_MAC, src=PEER_MAC, type=0x0800) / inner)
    buf = bytearray(frame)
    assert fwd.from_network(buf, len(buf), "192.168.77.11") == Verdict.DELIVER
    assert bytes(buf[fwd.out_start : fwd.out_end]) == inner
    assert fwd.counters.rx_packets == 1


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f[:21], DropReason.TRUNCATED),
        (lambda f: b"\x0c" + f[1:], DropReason.BAD_FLAGS),
        (lambda f: f[:7] + b"\x01" + f[8:], DropReason.BAD_FLAGS),
        (lambda f: f[:4] + b"\x00\x00\x02" + f[7:], DropReason.WRONG_VNI),
        (lambda f: f[:8] + b"\x02\x00\x00\x00\x00\x09" + f[14:], DropReason.UNKNOWN_MAC),
        (lambda f: f[:20] + b"\x08\x06" + f[22:], DropReason.BAD_ETHERTYPE),
    ],
)
def test_vxlan_decap_drops_by_reason(mutate: object, reason: DropReason) -> None:
    fwd = vxlan_fwd()
    inner = bytes(IP(src="10.244.2.5", dst="10.244.1.5") / ICMP())
    frame = bytes(VXLAN(vni=1, flags=0x08) / Ether(dst=OUR_MAC, src=PEER_MAC, type=0x0800) / inner)
    buf = bytearray(mutate(frame))  # type: ignore[operator]
    assert fwd.from_network(buf, len(buf), "192.168.77.11") == Verdict.DROP
    assert fwd.counters.drops[reason] == 1


def test_source_checks_and_accept_any_source() -> None:
    inner_ok = bytes(IP(src="10.244.2.5", dst="10.244.1.5") / ICMP())
    inner_spoofed = bytes(IP(src="10.244.9.5", dst="10.244.1.5") / ICMP())

    def frame(inner: bytes) -> bytearray:
        eth = Ether(dst=OUR_MAC, src=PEER_MAC, type=0x0800)
        return bytearray(bytes(VXLAN(vni=1, flags=0x08) / eth / inner))

    fwd = vxlan_fwd()
    f = frame(inner_ok)
    assert fwd.from_network(f, len(f), "192.168.77.99") == Verdict.DROP
    assert fwd.counters.drops[DropReason.UNKNOWN_SOURCE] == 1
    f = frame(inner_spoofed)
    assert fwd.from_network(f, len(f), "192.168.77.11") == Verdict.DROP
    assert fwd.counters.drops[DropReason.SPOOFED] == 1
    lax = vxlan_fwd(accept_any_source=True)
    f = frame(inner_spoofed)
    assert lax.from_network(f, len(f), "192.168.77.99") == Verdict.DELIVER


def test_no_route_answers_net_unreachable_like_flannel() -> None:
    fwd = vxlan_fwd()
    packet = bytes(IP(src="10.244.1.5", dst="10.244.7.1") / UDP(sport=1, dport=2) / b"hello")
    buf, start, end = load(fwd, packet)
    assert fwd.from_device(buf, start, end) == Verdict.REPLY
    reply = IP(fwd.reply)
    assert reply.src == "10.244.1.0" and reply.dst == "10.244.1.5" and reply.ttl == 8
    assert reply[ICMP].type == 3 and reply[ICMP].code == 0
    # The quote is the offending header + 8 bytes, and both checksums are right.
    assert bytes(reply[ICMP].payload)[:28] == packet[:28]
    assert IP(bytes(reply)).chksum == IP(fwd.reply).chksum
    recomputed = IP(fwd.reply)
    del recomputed.chksum
    del recomputed[ICMP].chksum
    assert bytes(IP(bytes(recomputed))) == fwd.reply
    assert fwd.counters.drops[DropReason.NO_ROUTE] == 1 and fwd.counters.icmp_sent == 1


def test_no_route_for_icmp_is_silent() -> None:
    fwd = vxlan_fwd()
    buf, start, end = load(fwd, ping(dst="10.244.7.1"))
    assert fwd.from_device(buf, start, end) == Verdict.DROP
    assert fwd.counters.drops[DropReason.NO_ROUTE] == 1 and fwd.counters.icmp_sent == 0


def test_too_big_with_df_gets_frag_needed_with_the_overlay_mtu() -> None:
    fwd = vxlan_fwd()
    packet = bytes(
        IP(src="10.244.1.5", dst="10.244.2.5", flags="DF") / UDP(sport=5, dport=6) / (b"z" * 1472)
    )
    buf, start, end = load(fwd, packet)
    assert fwd.from_device(buf, start, end) == Verdict.REPLY
    reply = IP(fwd.reply)
    assert reply[ICMP].type == 3 and reply[ICMP].code == 4
    assert reply[ICMP].nexthopmtu == 1450
    assert fwd.counters.drops[DropReason.TOO_BIG] == 1


def test_too_big_without_df_is_dropped() -> None:
    fwd = vxlan_fwd()
    packet = bytes(IP(src="10.244.1.5", dst="10.244.2.5") / UDP() / (b"z" * 1472))
    buf, start, end = load(fwd, packet)
    assert fwd.from_device(buf, start, end) == Verdict.DROP
    assert fwd.counters.drops[DropReason.TOO_BIG] == 1


def test_remove_peer_forgets_route_fdb_and_source() -> None:
    fwd = vxlan_fwd()
    assert fwd.remove_peer(PEER.subnet) is PEER
    assert fwd.fdb == {} and fwd.peers() == []
    buf, start, end = load(fwd, ping())
    assert fwd.from_device(buf, start, end) == Verdict.DROP
    assert fwd.counters.drops[DropReason.NO_ROUTE] == 1


def test_udp_backend_sends_raw_ip_and_decrements_ttl_both_ways() -> None:
    fwd = Forwarder(UdpBackend(), local_ip=LOCAL)
    fwd.add_peer(Peer(PEER.subnet, PEER.public_ip, None, 8285))
    packet = ping(ttl=63)
    buf, start, end = load(fwd, packet)
    assert fwd.from_device(buf, start, end) == Verdict.SEND
    out = IP(bytes(buf[fwd.out_start : fwd.out_end]))
    assert out.ttl == 62 and fwd.out_peer.sockaddr == ("192.168.77.11", 8285)  # type: ignore[union-attr]
    check = out.copy()
    del check.chksum
    assert IP(bytes(check)).chksum == out.chksum
    back = bytearray(bytes(IP(src="10.244.2.5", dst="10.244.1.5", ttl=5) / ICMP()))
    assert fwd.from_network(back, len(back), "192.168.77.11") == Verdict.DELIVER
    assert IP(bytes(back[fwd.out_start : fwd.out_end])).ttl == 4


def test_udp_backend_drops_when_ttl_runs_out() -> None:
    fwd = Forwarder(UdpBackend(), local_ip=LOCAL)
    fwd.add_peer(Peer(PEER.subnet, PEER.public_ip, None, 8285))
    buf, start, end = load(fwd, ping(ttl=1))
    assert fwd.from_device(buf, start, end) == Verdict.DROP
    assert fwd.counters.drops[DropReason.TTL_EXCEEDED] == 1
    short = bytearray(b"\x45" + bytes(10))
    assert fwd.from_network(short, len(short), "192.168.77.11") == Verdict.DROP
    assert fwd.counters.drops[DropReason.TRUNCATED] == 1


def test_hostgw_resolves_then_frames_to_the_gateway_mac() -> None:
    underlay_mac = bytes.fromhex("02000000aa01")
    backend = HostGwBackend(underlay_mac, [IPv4Interface("192.168.77.10/24")])
    fwd = Forwarder(backend, local_ip=LOCAL)
    fwd.add_peer(Peer(PEER.subnet, PEER.public_ip))
    packet = ping()
    buf, start, end = load(fwd, packet)
    assert fwd.from_device(buf, start, end) == Verdict.DROP
    assert fwd.counters.drops[DropReason.NEIGH_UNRESOLVED] == 1
    assert backend.unresolved == {PEER.public_ip}
    backend.learn(PEER.public_ip, bytes.fromhex("02000000aa02"))
    buf, start, end = load(fwd, packet)
    assert fwd.from_device(buf, start, end) == Verdict.SEND
    frame = Ether(bytes(buf[fwd.out_start : fwd.out_end]))
    assert frame.dst == "02:00:00:00:aa:02" and frame.src == "02:00:00:00:aa:01"
    assert bytes(frame.payload) == packet


def test_hostgw_refuses_a_peer_that_is_not_onlink() -> None:
    backend = HostGwBackend(bytes(6), [IPv4Interface("192.168.77.10/24")])
    fwd = Forwarder(backend, local_ip=LOCAL)
    fwd.add_peer(Peer(PEER.subnet, IPv4Address("172.31.0.9")))
    buf, start, end = load(fwd, ping())
    assert fwd.from_device(buf, start, end) == Verdict.DROP
    assert fwd.counters.drops[DropReason.NOT_ONLINK] == 1
    assert backend.unresolved == set()


def test_tap_mode_uses_the_fdb_and_keeps_the_kernel_frame() -> None:
    fwd = Forwarder(VxlanBackend(1, OUR_MAC, l2=True), local_ip=LOCAL)
    fwd.add_peer(PEER)
    frame = bytes(Ether(dst=PEER_MAC, src=OUR_MAC) / ping())
    buf, start, end = load(fwd, frame)
    assert fwd.from_device(buf, start, end) == Verdict.SEND
    out = bytes(buf[fwd.out_start : fwd.out_end])
    assert out[:8] == bytes.fromhex("0800000000000100") and out[8:] == frame
    unknown = bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=OUR_MAC) / ping())
    buf, start, end = load(fwd, unknown)
    assert fwd.from_device(buf, start, end) == Verdict.DROP
    assert fwd.counters.drops[DropReason.UNKNOWN_MAC] == 1
    big = bytes(Ether(dst=PEER_MAC, src=OUR_MAC, type=0x0800) / ping(size=1600))
    buf, start, end = load(fwd, big)
    assert fwd.from_device(buf, start, end) == Verdict.REPLY
    reply = Ether(fwd.reply)
    assert reply.dst == "02:aa:bb:cc:dd:01" and reply.src == "02:aa:bb:cc:dd:02"
    assert reply[ICMP].type == 3 and reply[ICMP].code == 4 and reply[ICMP].nexthopmtu == 1450


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_hostile_datagrams_never_raise(data: bytes) -> None:
    for fwd in (vxlan_fwd(), vxlan_fwd(accept_any_source=True)):
        buf = bytearray(data)
        assert fwd.from_network(buf, len(buf), "192.168.77.11") in (Verdict.DROP, Verdict.DELIVER)
    udp = Forwarder(UdpBackend(), local_ip=LOCAL)
    udp.add_peer(Peer(PEER.subnet, PEER.public_ip, None, 8285))
    buf = bytearray(data)
    assert udp.from_network(buf, len(buf), "192.168.77.11") in (Verdict.DROP, Verdict.DELIVER)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_from_the_device_never_raises(data: bytes) -> None:
    for fwd in (vxlan_fwd(), Forwarder(VxlanBackend(1, OUR_MAC, l2=True), local_ip=LOCAL)):
        fwd.add_peer(PEER)
        buf, start, end = load(fwd, data)
        assert fwd.from_device(buf, start, end) in (Verdict.DROP, Verdict.SEND, Verdict.REPLY)


def test_ipv6_too_big_gets_packet_too_big_when_the_device_has_an_ipv6_address() -> None:
    from ipaddress import IPv6Address, IPv6Network

    from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6

    fwd = Forwarder(VxlanBackend(1, OUR_MAC), local_ip=LOCAL, local_ip6=IPv6Address("fd00:1::"))
    fwd.add_peer(Peer(IPv6Network("fd00:2::/64"), PEER.public_ip, PEER_MAC, 8472))
    packet = bytes(IPv6(src="fd00:1::5", dst="fd00:2::5") / UDP() / (b"z" * 1452))
    buf, start, end = load(fwd, packet)
    assert fwd.from_device(buf, start, end) == Verdict.REPLY
    reply = IPv6(fwd.reply)
    assert reply.dst == "fd00:1::5" and reply[ICMPv6PacketTooBig].mtu == 1450
    assert len(fwd.reply) <= 1280
    small = bytes(IPv6(src="fd00:1::5", dst="fd00:2::5") / UDP() / b"ok")
    buf, start, end = load(fwd, small)
    assert fwd.from_device(buf, start, end) == Verdict.SEND
