"""VXLAN codec, checked against a frame as the Linux kernel puts it on the wire."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from dataplane.packet.errors import DecodeError
from dataplane.packet.ethernet import ETH_HLEN, EtherType, build_ethernet, parse_ethernet
from dataplane.packet.icmp import IcmpType, build_icmp, icmp_checksum_ok, parse_icmp
from dataplane.packet.ipv4 import (
    IP_DF,
    IPV4_HLEN,
    IPProto,
    build_ipv4,
    ipv4_header_checksum_ok,
    parse_ipv4,
)
from dataplane.packet.udp import UDP_HLEN, build_udp, parse_udp
from dataplane.packet.vxlan import (
    VNI_MAX,
    VXLAN_FLAG_I,
    VXLAN_HLEN,
    VXLAN_OVERHEAD_V4,
    VXLAN_OVERHEAD_V6,
    VXLAN_PORT_IANA,
    VXLAN_PORT_LINUX,
    VXLAN_STRUCT,
    VxlanHeader,
    build_vxlan,
    pack_vxlan_into,
    parse_vxlan,
)

# A pod on 10.244.0.0/24 pings a pod on 10.244.1.0/24 through flannel.1 (VNI 1,
# port 8472). Outer: node 192.168.50.10 -> 192.168.50.11, no DF, TTL 64, UDP
# checksum 0 (the kernel's default for VXLAN over IPv4), source port from the
# flow hash. Inner: VtepMAC to VtepMAC, the echo request after one hop (TTL 63).
KERNEL_FRAME = bytes.fromhex(
    "525400123402 525400123401 0800"  # outer Ethernet
    " 4500 005e 1a2b 0000 40 11 7afe c0a8320a c0a8320b"  # outer IPv4
    " c0a9 2118 004a 0000"  # UDP 49321 -> 8472, length 74, checksum 0
    " 08 000000 000001 00"  # VXLAN: flags I, VNI 1
    " a23e117f0002 6e8c4a0d9101 0800"  # inner Ethernet
    " 4500 002c beef 4000 3f 01 65f5 0af40002 0af40103"  # inner IPv4, DF, TTL 63
    " 08 00 9b5d 0a1b 0001"  # ICMP echo request, id 0x0a1b seq 1
    " a1b2c3d400000000e5f6070800000000"  # 16 bytes of ping data
)
PING_PAYLOAD = bytes.fromhex("a1b2c3d400000000e5f6070800000000")


def test_constants() -> None:
    assert VXLAN_OVERHEAD_V4 == ETH_HLEN + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN == 50
    assert VXLAN_OVERHEAD_V6 == 70
    assert (VXLAN_PORT_LINUX, VXLAN_PORT_IANA, VXLAN_FLAG_I) == (8472, 4789, 0x08)


def test_parse_kernel_frame_layer_by_layer() -> None:
    outer_eth, rest = parse_ethernet(KERNEL_FRAME)
    assert outer_eth.ethertype == EtherType.IPV4
    outer_ip, rest = parse_ipv4(rest)
    assert ipv4_header_checksum_ok(KERNEL_FRAME[ETH_HLEN:])
    assert outer_ip.protocol == IPProto.UDP and outer_ip.flags == 0 and outer_ip.ttl == 64
    assert outer_ip.src == ipaddress.IPv4Address("192.168.50.10")
    udp, rest = parse_udp(rest)
    assert (udp.dst_port, udp.checksum, udp.length) == (VXLAN_PORT_LINUX, 0, 74)

    vxlan, rest = parse_vxlan(rest)
    assert vxlan == VxlanHeader(flags=VXLAN_FLAG_I, vni=1, reserved1=0, reserved2=0)
    assert vxlan.valid
    assert len(rest) == len(KERNEL_FRAME) - VXLAN_OVERHEAD_V4

    inner_eth, rest = parse_ethernet(rest)
    assert inner_eth.dst == bytes.fromhex("a23e117f0002")
    inner_ip, rest = parse_ipv4(rest)
    assert inner_ip.dst == ipaddress.IPv4Address("10.244.1.3")
    assert inner_ip.ttl == 63 and inner_ip.flags == IP_DF
    assert ipv4_header_checksum_ok(KERNEL_FRAME[VXLAN_OVERHEAD_V4 + ETH_HLEN :])
    icmp, payload = parse_icmp(rest)
    assert (icmp.type, icmp.code, icmp.rest) == (IcmpType.ECHO_REQUEST, 0, 0x0A1B0001)
    assert icmp_checksum_ok(rest)
    assert bytes(payload) == PING_PAYLOAD


def test_rebuild_kernel_frame_byte_for_byte() -> None:
    icmp = build_icmp(IcmpType.ECHO_REQUEST, 0, 0x0A1B0001, PING_PAYLOAD)
    inner_ip = build_ipv4(
        "10.244.0.2", "10.244.1.3", IPProto.ICMP, icmp, ttl=63, identification=0xBEEF, flags=IP_DF
    )
    inner = build_ethernet(
        bytes.fromhex("a23e117f0002"), bytes.fromhex("6e8c4a0d9101"), EtherType.IPV4, inner_ip
    )
    udp = build_udp(49321, VXLAN_PORT_LINUX, build_vxlan(1, inner))
    outer_ip = build_ipv4("192.168.50.10", "192.168.50.11", IPProto.UDP, udp, identification=0x1A2B)
    frame = build_ethernet(
        bytes.fromhex("525400123402"), bytes.fromhex("525400123401"), EtherType.IPV4, outer_ip
    )
    assert frame == KERNEL_FRAME


def test_scapy_agrees_on_the_frame() -> None:
    packet = Ether(KERNEL_FRAME)
    assert packet[UDP].dport == 8472
    assert packet[VXLAN].vni == 1 and packet[VXLAN].flags == 0x08
    inner = packet[VXLAN].payload
    assert inner[IP].src == "10.244.0.2" and inner[ICMP].type == 8
    # scapy recomputes the checksums it is not given; they match the frame's.
    for layer, cls in ((packet[IP], IP), (inner[IP], IP), (inner[ICMP], ICMP)):
        copy = layer.copy()
        copy.chksum = None
        assert cls(bytes(copy)).chksum == layer.chksum


@pytest.mark.parametrize("vni", [0, 1, 42, 4096, 0xABCDEF, VNI_MAX])
def test_build_matches_scapy_and_round_trips(vni: int) -> None:
    ours = build_vxlan(vni, b"inner")
    assert ours == bytes(VXLAN(vni=vni, flags=0x08) / b"inner")
    header, payload = parse_vxlan(ours)
    assert header.vni == vni and header.valid
    assert bytes(payload) == b"inner"


def test_pack_into() -> None:
    buf = bytearray(b"\xee" * 20)
    pack_vxlan_into(buf, 6, 0x123456)
    assert buf[6:14] == bytes.fromhex("0800000012345600")
    assert buf[:6] == b"\xee" * 6 and buf[14:] == b"\xee" * 6
    view = memoryview(bytearray(8))
    pack_vxlan_into(view, 0, 1)
    assert bytes(view) == build_vxlan(1)
    assert VXLAN_STRUCT.size == VXLAN_HLEN


@pytest.mark.parametrize("vni", [-1, VNI_MAX + 1, 1 << 32])
def test_vni_range(vni: int) -> None:
    with pytest.raises(ValueError):
        build_vxlan(vni)
    with pytest.raises(ValueError):
        pack_vxlan_into(bytearray(8), 0, vni)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0000000000000100", VxlanHeader(0x00, 1, 0, 0)),  # no I flag
        ("0c00000000000100", VxlanHeader(0x0C, 1, 0, 0)),  # an extension flag too
        ("08000001000001ff", VxlanHeader(0x08, 1, 1, 0xFF)),  # reserved bits set
    ],
)
def test_reports_but_flags_invalid_headers(raw: str, expected: VxlanHeader) -> None:
    header, _ = parse_vxlan(bytes.fromhex(raw))
    assert header == expected
    assert not header.valid


def test_truncated() -> None:
    with pytest.raises(DecodeError):
        parse_vxlan(build_vxlan(1)[:7])
