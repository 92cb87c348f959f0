"""IPv6 fixed header codec."""

from __future__ import annotations

import ipaddress
import random

import pytest
from scapy.layers.inet6 import IPv6

from dataplane.packet.errors import DecodeError
from dataplane.packet.ipv4 import IPProto
from dataplane.packet.ipv6 import IPV6_HLEN, IPv6Header, build_ipv6, parse_ipv6

# scapy's IPv6(src="fd00::1", dst="fd00::2")/ICMPv6EchoRequest(id=0x1234, seq=7, data=b"ping").
PACKET = bytes.fromhex(
    "60000000 000c 3a 40"  # version 6, payload length 12, ICMPv6, hop limit 64
    " fd000000000000000000000000000001"
    " fd000000000000000000000000000002"
    " 80 00 94a8 1234 0007 70696e67"
)


def test_parse_vector() -> None:
    header, payload = parse_ipv6(PACKET)
    assert header == IPv6Header(
        traffic_class=0,
        flow_label=0,
        payload_length=12,
        next_header=IPProto.ICMPV6,
        hop_limit=64,
        src=ipaddress.IPv6Address("fd00::1"),
        dst=ipaddress.IPv6Address("fd00::2"),
    )
    assert isinstance(payload, memoryview)
    assert bytes(payload) == PACKET[IPV6_HLEN:]


def test_build_vector() -> None:
    assert build_ipv6("fd00::1", "fd00::2", IPProto.ICMPV6, PACKET[IPV6_HLEN:]) == PACKET
    assert (
        build_ipv6(
            ipaddress.IPv6Address("fd00::1"), PACKET[24:40], 58, bytearray(PACKET[IPV6_HLEN:])
        )
        == PACKET
    )


def test_traffic_class_and_flow_label_round_trip() -> None:
    built = build_ipv6(
        "2001:db8::1",
        "2001:db8::2",
        17,
        b"xyz",
        hop_limit=3,
        traffic_class=0xAB,
        flow_label=0xFEDCB,
    )
    assert built[:4] == bytes.fromhex("6abfedcb")
    header, payload = parse_ipv6(built)
    assert (header.traffic_class, header.flow_label, header.hop_limit) == (0xAB, 0xFEDCB, 3)
    rebuilt = build_ipv6(
        header.src,
        header.dst,
        header.next_header,
        payload,
        hop_limit=header.hop_limit,
        traffic_class=header.traffic_class,
        flow_label=header.flow_label,
    )
    assert rebuilt == built


def test_builder_matches_scapy() -> None:
    rng = random.Random(8200)
    for _ in range(50):
        src = str(ipaddress.IPv6Address(rng.getrandbits(128)))
        dst = str(ipaddress.IPv6Address(rng.getrandbits(128)))
        payload = rng.randbytes(rng.randint(0, 80))
        tc, fl, hlim = rng.randint(0, 255), rng.getrandbits(20), rng.randint(0, 255)
        ours = build_ipv6(src, dst, 59, payload, hop_limit=hlim, traffic_class=tc, flow_label=fl)
        theirs = IPv6(src=src, dst=dst, nh=59, hlim=hlim, tc=tc, fl=fl) / payload
        assert ours == bytes(theirs)


def test_trailing_padding_ignored() -> None:
    _, payload = parse_ipv6(PACKET + bytes(6))
    assert bytes(payload) == PACKET[IPV6_HLEN:]


def test_rejects() -> None:
    with pytest.raises(DecodeError):
        parse_ipv6(PACKET[:-1])  # payload length exceeds the data
    with pytest.raises(DecodeError):
        parse_ipv6(b"\x40" + PACKET[1:])  # version 4
    with pytest.raises(DecodeError):
        parse_ipv6(PACKET[: IPV6_HLEN - 1])


def test_build_rejects() -> None:
    with pytest.raises(ValueError):
        build_ipv6("fd00::1", "fd00::2", 17, b"", traffic_class=256)
    with pytest.raises(ValueError):
        build_ipv6("fd00::1", "fd00::2", 17, b"", flow_label=1 << 20)
    with pytest.raises(ValueError):
        build_ipv6("fd00::1", "fd00::2", 17, bytes(65536))
    with pytest.raises(ValueError):
        build_ipv6("10.0.0.1", "fd00::2", 17, b"")
    with pytest.raises(ValueError):
        build_ipv6(bytes(4), "fd00::2", 17, b"")
