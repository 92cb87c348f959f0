"""Every parser on truncated and arbitrary input: DecodeError and nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane.packet.arp import ArpOp, build_arp, parse_arp
from dataplane.packet.errors import DecodeError
from dataplane.packet.ethernet import EtherType, build_ethernet, parse_ethernet
from dataplane.packet.icmp import (
    Icmp6Type,
    IcmpType,
    build_icmp,
    build_icmpv4_error,
    build_icmpv6_error,
    icmp_checksum_ok,
    icmpv6_checksum_ok,
    parse_icmp,
    should_send_icmp_error,
    should_send_icmpv6_error,
)
from dataplane.packet.ipv4 import IP_DF, build_ipv4, ipv4_header_checksum_ok, parse_ipv4
from dataplane.packet.ipv6 import build_ipv6, parse_ipv6
from dataplane.packet.udp import build_udp, parse_udp, udp_checksum_ok
from dataplane.packet.vxlan import build_vxlan, parse_vxlan

MAC_A, MAC_B = bytes.fromhex("525400123401"), bytes.fromhex("525400123402")
IPV4 = build_ipv4(
    "10.244.0.2", "10.244.1.3", 17, build_udp(1, 2, b"data"), flags=IP_DF, options=b"\x01" * 4
)
IPV6 = build_ipv6("fd00::1", "fd00::2", 17, build_udp(1, 2, b"data"))

# (parser, a valid packet, the shortest prefix of it that parses)
CODECS: dict[str, tuple[Callable[[Any], object], bytes, int]] = {
    "ethernet": (parse_ethernet, build_ethernet(MAC_A, MAC_B, EtherType.IPV4, IPV4), 14),
    "arp": (parse_arp, build_arp(ArpOp.REQUEST, MAC_A, "10.0.0.1", bytes(6), "10.0.0.2"), 28),
    "ipv4": (parse_ipv4, IPV4, len(IPV4)),  # total_length covers the whole packet
    "ipv6": (parse_ipv6, IPV6, len(IPV6)),  # so does payload_length
    "udp": (parse_udp, build_udp(1, 2, b"payload"), 15),  # and the UDP length
    "vxlan": (parse_vxlan, build_vxlan(1, b"frame"), 8),
    "icmp": (parse_icmp, build_icmp(IcmpType.ECHO_REQUEST, 0, 1, b"ping"), 8),
}


@pytest.mark.parametrize("name", CODECS)
def test_every_short_prefix_raises_decode_error(name: str) -> None:
    parse, packet, shortest = CODECS[name]
    for i in range(shortest):
        for data in (packet[:i], bytearray(packet[:i]), memoryview(packet)[:i]):
            with pytest.raises(DecodeError):
                parse(data)
    parse(packet[:shortest])
    parse(memoryview(packet))


def _mutated(packet: bytes) -> st.SearchStrategy[bytes]:
    """The valid packet with a few bytes overwritten, then cut anywhere."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(packet)
        for _ in range(draw(st.integers(0, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))])

    return build()


def _inputs(name: str) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=96), _mutated(CODECS[name][1]))


def _only_decode_error(parse: Callable[[Any], object], data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        parse(data)


@pytest.mark.parametrize("name", CODECS)
def test_arbitrary_bytes_raise_only_decode_error(name: str) -> None:
    parse = CODECS[name][0]

    @given(_inputs(name))
    def check(data: bytes) -> None:
        _only_decode_error(parse, data)

    check()


@given(st.one_of(st.binary(max_size=80), _mutated(IPV4)))
def test_ipv4_helpers_never_raise(data: bytes) -> None:
    assert isinstance(should_send_icmp_error(data), bool)
    assert isinstance(ipv4_header_checksum_ok(data), bool)
    assert isinstance(icmp_checksum_ok(data), bool)
    assert isinstance(udp_checksum_ok(data, "10.0.0.1", "10.0.0.2"), bool)
    _only_decode_error(lambda d: build_icmpv4_error(IcmpType.DEST_UNREACH, 0, d, "10.0.0.1"), data)


@given(st.one_of(st.binary(max_size=80), _mutated(IPV6)))
def test_ipv6_helpers_never_raise(data: bytes) -> None:
    assert isinstance(should_send_icmpv6_error(data, Icmp6Type.DEST_UNREACH), bool)
    assert isinstance(icmpv6_checksum_ok(data, "fd00::1", "fd00::2"), bool)
    assert isinstance(udp_checksum_ok(data, "fd00::1", "fd00::2"), bool)
    _only_decode_error(lambda d: build_icmpv6_error(Icmp6Type.DEST_UNREACH, 0, d, "fd00::1"), data)
