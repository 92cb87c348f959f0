"""IPv4 header codec, header checksum and in-place TTL decrement."""

from __future__ import annotations

import ipaddress
import random

import pytest
from scapy.layers.inet import IP, IPOption_NOP

from dataplane.packet.checksum import internet_checksum
from dataplane.packet.errors import DecodeError
from dataplane.packet.ipv4 import (
    IP_DF,
    IP_MF,
    IPV4_HLEN,
    IPProto,
    IPv4Header,
    build_ipv4,
    ipv4_decrement_ttl,
    ipv4_header_checksum_ok,
    parse_ipv4,
)

# 192.168.0.1 -> 192.168.0.199, UDP, DF, total length 0x73, checksum b861.
HEADER = bytes.fromhex("4500 0073 0000 4000 40 11 b861 c0a80001 c0a800c7")
PACKET = HEADER + bytes(range(0x73 - IPV4_HLEN))
# scapy's IP(src="10.0.0.1", dst="10.0.0.2")/UDP(sport=5353, dport=53)/"weft".
UDP_PACKET = bytes.fromhex(
    "4500 0020 0001 0000 40 11 66ca 0a000001 0a000002"  # IPv4
    " 14e9 0035 000c f8db"  # UDP
    " 77656674"
)


def test_parse_vector() -> None:
    header, payload = parse_ipv4(PACKET)
    assert header == IPv4Header(
        tos=0,
        total_length=0x73,
        identification=0,
        flags=IP_DF,
        fragment_offset=0,
        ttl=64,
        protocol=IPProto.UDP,
        checksum=0xB861,
        src=ipaddress.IPv4Address("192.168.0.1"),
        dst=ipaddress.IPv4Address("192.168.0.199"),
    )
    assert header.header_length == IPV4_HLEN
    assert header.dont_fragment and not header.more_fragments and not header.is_fragment
    assert isinstance(payload, memoryview)
    assert bytes(payload) == PACKET[IPV4_HLEN:]
    assert ipv4_header_checksum_ok(PACKET)


def test_build_vector() -> None:
    built = build_ipv4("192.168.0.1", "192.168.0.199", IPProto.UDP, PACKET[IPV4_HLEN:], flags=IP_DF)
    assert built == PACKET
    built = build_ipv4(
        ipaddress.IPv4Address("10.0.0.1"),
        bytes([10, 0, 0, 2]),
        17,
        UDP_PACKET[20:],
        identification=1,
    )
    assert built == UDP_PACKET


def test_round_trip_with_options_and_fragment_fields() -> None:
    options = bytes.fromhex("01010100")  # NOP NOP NOP EOL
    built = build_ipv4(
        "10.1.2.3",
        "10.3.2.1",
        IPProto.TCP,
        b"abcdefgh",
        ttl=7,
        identification=0xBEEF,
        flags=IP_MF,
        tos=0xB8,
        fragment_offset=0x1234 & 0x1FFF,
        options=options,
    )
    header, payload = parse_ipv4(built)
    assert header.header_length == 24 and header.options == options
    assert (header.ttl, header.identification, header.tos) == (7, 0xBEEF, 0xB8)
    assert header.flags == IP_MF and header.fragment_offset == 0x1234
    assert header.more_fragments and header.is_fragment
    assert bytes(payload) == b"abcdefgh"
    assert ipv4_header_checksum_ok(built)
    rebuilt = build_ipv4(
        header.src,
        header.dst,
        header.protocol,
        payload,
        ttl=header.ttl,
        identification=header.identification,
        flags=header.flags,
        tos=header.tos,
        fragment_offset=header.fragment_offset,
        options=header.options,
    )
    assert rebuilt == built


def test_builder_matches_scapy() -> None:
    rng = random.Random(791)
    for _ in range(50):
        src = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        dst = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        payload = rng.randbytes(rng.randint(0, 100))
        ttl, ident, tos = rng.randint(0, 255), rng.randint(0, 0xFFFF), rng.randint(0, 255)
        frag = rng.randint(0, 0x1FFF)
        flags = rng.choice([0, IP_DF, IP_MF])
        nops = rng.randint(0, 2) * 4
        ours = build_ipv4(
            src,
            dst,
            17,
            payload,
            ttl=ttl,
            identification=ident,
            tos=tos,
            flags=flags,
            fragment_offset=frag,
            options=b"\x01" * nops,
        )
        theirs = (
            IP(
                src=src,
                dst=dst,
                proto=17,
                ttl=ttl,
                id=ident,
                tos=tos,
                flags=flags >> 13,
                frag=frag,
                options=[IPOption_NOP()] * nops,
            )
            / payload
        )
        assert ours == bytes(theirs)


def test_trailing_padding_ignored() -> None:
    header, payload = parse_ipv4(UDP_PACKET + bytes(14))
    assert header.total_length == len(UDP_PACKET)
    assert bytes(payload) == UDP_PACKET[20:]


def test_accepts_buffer_types() -> None:
    for data in (bytearray(UDP_PACKET), memoryview(UDP_PACKET)):
        header, payload = parse_ipv4(data)
        assert header.dst == ipaddress.IPv4Address("10.0.0.2")
        assert bytes(payload) == UDP_PACKET[20:]
        assert ipv4_header_checksum_ok(data)


@pytest.mark.parametrize(
    ("packet", "what"),
    [
        (b"\x65" + UDP_PACKET[1:], "version"),
        (b"\x44" + UDP_PACKET[1:], "header length"),
        (UDP_PACKET[:2] + b"\x00\x13" + UDP_PACKET[4:], "total length below header"),
        (UDP_PACKET[:2] + b"\x00\x21" + UDP_PACKET[4:], "total length past data"),
        (b"\x4f" + UDP_PACKET[1:], "options past data"),
    ],
)
def test_rejects(packet: bytes, what: str) -> None:
    with pytest.raises(DecodeError):
        parse_ipv4(packet)


def test_checksum_ok_detects_corruption() -> None:
    corrupted = bytearray(UDP_PACKET)
    corrupted[8] ^= 0x01
    assert not ipv4_header_checksum_ok(corrupted)
    assert not ipv4_header_checksum_ok(UDP_PACKET[:19])
    assert not ipv4_header_checksum_ok(b"\x4f" + UDP_PACKET[1:])


def test_build_rejects() -> None:
    with pytest.raises(ValueError):
        build_ipv4("10.0.0.1", "10.0.0.2", 17, b"", flags=0x1000)
    with pytest.raises(ValueError):
        build_ipv4("10.0.0.1", "10.0.0.2", 17, b"", fragment_offset=0x2000)
    with pytest.raises(ValueError):
        build_ipv4("10.0.0.1", "10.0.0.2", 17, b"", options=b"\x01")
    with pytest.raises(ValueError):
        build_ipv4("10.0.0.1", "10.0.0.2", 17, bytes(65516))
    with pytest.raises(ValueError):
        build_ipv4("10.0.0.1", b"\x0a\x00\x00", 17, b"")
    with pytest.raises(ValueError):
        build_ipv4("fd00::1", "10.0.0.2", 17, b"")


def test_decrement_ttl_in_place() -> None:
    rng = random.Random(1624)
    for _ in range(500):
        ttl = rng.randint(2, 255)
        offset = rng.randint(0, 20)
        packet = build_ipv4(
            rng.randbytes(4),
            rng.randbytes(4),
            rng.randint(0, 255),
            rng.randbytes(8),
            ttl=ttl,
            identification=rng.randint(0, 0xFFFF),
        )
        buf = bytearray(offset) + bytearray(packet)
        assert ipv4_decrement_ttl(buf, offset) == ttl - 1
        patched = buf[offset:]
        assert patched[8] == ttl - 1
        assert ipv4_header_checksum_ok(patched)
        zeroed = bytearray(patched[:20])
        zeroed[10:12] = b"\x00\x00"
        assert patched[10] << 8 | patched[11] == internet_checksum(zeroed)
        assert patched[20:] == packet[20:]


@pytest.mark.parametrize("ttl", [0, 1])
def test_decrement_ttl_expired_leaves_packet(ttl: int) -> None:
    packet = bytearray(build_ipv4("10.0.0.1", "10.0.0.2", 1, b"", ttl=ttl))
    before = bytes(packet)
    assert ipv4_decrement_ttl(memoryview(packet)) == 0
    assert bytes(packet) == before
