"""UDP codec and pseudo-header checksums (IPv4 and IPv6)."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from dataplane.packet.checksum import ones_complement_sum, pseudo_header_sum_v4
from dataplane.packet.errors import DecodeError
from dataplane.packet.udp import UDP_HLEN, UDPHeader, build_udp, parse_udp, udp_checksum_ok

# From scapy: IP(10.0.0.1 -> 10.0.0.2)/UDP(sport=5353, dport=53)/"weft".
DATAGRAM_V4 = bytes.fromhex("14e90035000cf8db77656674")
# From scapy: IPv6(fd00::1 -> fd00::2)/UDP(sport=40000, dport=4789)/"abc".
DATAGRAM_V6 = bytes.fromhex("9c4012b5000b927b616263")


def test_parse_vector() -> None:
    header, payload = parse_udp(DATAGRAM_V4)
    assert header == UDPHeader(src_port=5353, dst_port=53, length=12, checksum=0xF8DB)
    assert isinstance(payload, memoryview)
    assert bytes(payload) == b"weft"


def test_build_vectors() -> None:
    assert build_udp(5353, 53, b"weft", "10.0.0.1", "10.0.0.2") == DATAGRAM_V4
    assert build_udp(40000, 4789, b"abc", "fd00::1", "fd00::2") == DATAGRAM_V6
    assert (
        build_udp(
            40000,
            4789,
            memoryview(b"abc"),
            ipaddress.IPv6Address("fd00::1"),
            ipaddress.IPv6Address("fd00::2").packed,
        )
        == DATAGRAM_V6
    )


def test_no_addresses_means_no_checksum() -> None:
    built = build_udp(5353, 53, b"weft")
    assert built == DATAGRAM_V4[:6] + b"\x00\x00" + DATAGRAM_V4[8:]


def test_round_trip() -> None:
    header, payload = parse_udp(DATAGRAM_V6)
    rebuilt = build_udp(header.src_port, header.dst_port, payload, "fd00::1", "fd00::2")
    assert rebuilt == DATAGRAM_V6


def test_checksum_ok() -> None:
    assert udp_checksum_ok(DATAGRAM_V4, "10.0.0.1", "10.0.0.2")
    assert not udp_checksum_ok(DATAGRAM_V4, "10.0.0.1", "10.0.0.3")
    assert udp_checksum_ok(DATAGRAM_V6, "fd00::1", "fd00::2")
    assert udp_checksum_ok(DATAGRAM_V4 + b"pad", bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    assert not udp_checksum_ok(DATAGRAM_V4[:-1], "10.0.0.1", "10.0.0.2")
    assert not udp_checksum_ok(DATAGRAM_V4[:7], "10.0.0.1", "10.0.0.2")


def test_zero_checksum_rules() -> None:
    v4 = build_udp(1, 2, b"x")
    assert udp_checksum_ok(v4, "10.0.0.1", "10.0.0.2")
    v6 = build_udp(1, 2, b"x")
    assert not udp_checksum_ok(v6, "fd00::1", "fd00::2")
    assert udp_checksum_ok(v6, "fd00::1", "fd00::2", zero_ok_v6=True)


def test_computed_zero_is_sent_as_ffff() -> None:
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    # Choose the payload word that makes the whole sum 0xFFFF, so ~sum == 0.
    length = UDP_HLEN + 2
    partial = ones_complement_sum(
        struct.pack("!HHHH", 1000, 2000, length, 0), pseudo_header_sum_v4(src, dst, 17, length)
    )
    payload = struct.pack("!H", ~partial & 0xFFFF)
    built = build_udp(1000, 2000, payload, src, dst)
    assert built[6:8] == b"\xff\xff"
    assert udp_checksum_ok(built, src, dst)


def test_builder_matches_scapy() -> None:
    rng = random.Random(768)
    for family in (4, 6) * 25:
        bits = 32 if family == 4 else 128
        src = str(ipaddress.ip_address(rng.getrandbits(bits)))
        dst = str(ipaddress.ip_address(rng.getrandbits(bits)))
        sport, dport = rng.randint(0, 0xFFFF), rng.randint(0, 0xFFFF)
        payload = rng.randbytes(rng.randint(0, 99))
        ours = build_udp(sport, dport, payload, src, dst)
        if family == 4:
            outer = IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload
        else:
            outer = IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload
        theirs = bytes(outer)[20 if family == 4 else 40 :]
        assert ours == theirs
        assert udp_checksum_ok(ours, src, dst)


def test_parse_rejects() -> None:
    with pytest.raises(DecodeError):
        parse_udp(DATAGRAM_V4[:4] + b"\x00\x07" + DATAGRAM_V4[6:])  # length below 8
    with pytest.raises(DecodeError):
        parse_udp(DATAGRAM_V4[:-1])  # length past the data


def test_trailing_bytes_ignored() -> None:
    _, payload = parse_udp(DATAGRAM_V4 + b"trailer")
    assert bytes(payload) == b"weft"


def test_build_rejects() -> None:
    with pytest.raises(ValueError):
        build_udp(1, 2, b"", "10.0.0.1", None)
    with pytest.raises(ValueError):
        build_udp(1, 2, b"", "10.0.0.1", "fd00::1")
    with pytest.raises(ValueError):
        build_udp(1, 2, bytes(65528))
