"""ICMP / ICMPv6 codecs and the error packets the forwarder sends."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import ICMPv6EchoRequest, ICMPv6PacketTooBig, IPv6

from dataplane.packet.errors import DecodeError
from dataplane.packet.icmp import (
    ICMP_HLEN,
    Icmp6Type,
    IcmpHeader,
    IcmpType,
    IcmpUnreachCode,
    build_icmp,
    build_icmpv4_error,
    build_icmpv6,
    build_icmpv6_error,
    icmp_checksum_ok,
    icmpv6_checksum_ok,
    parse_icmp,
    should_send_icmp_error,
    should_send_icmpv6_error,
)
from dataplane.packet.ipv4 import (
    IP_DF,
    IP_MF,
    IPProto,
    build_ipv4,
    ipv4_header_checksum_ok,
    parse_ipv4,
)
from dataplane.packet.ipv6 import IPV6_HLEN, IPV6_MIN_MTU, build_ipv6, parse_ipv6
from dataplane.packet.udp import build_udp

# Echo request id 0x0a1b seq 1 with 16 bytes of data (from a kernel-made ping).
ECHO = bytes.fromhex("08 00 9b5d 0a1b 0001 a1b2c3d400000000e5f6070800000000")
# ICMPv6 echo request fd00::1 -> fd00::2, id 0x1234 seq 7, "ping" (from scapy).
ECHO6 = bytes.fromhex("80 00 94a8 1234 0007 70696e67")

GATEWAY = "10.244.0.0"
# A TCP SYN-sized packet from a pod, DF set, 1400 bytes in all.
OFFENDING = build_ipv4(
    "10.244.0.2",
    "10.244.7.9",
    IPProto.TCP,
    bytes.fromhex("c3500050deadbeef") + bytes(1372),
    ttl=64,
    identification=0x4242,
    flags=IP_DF,
)


def test_parse_echo() -> None:
    header, payload = parse_icmp(ECHO)
    assert header == IcmpHeader(IcmpType.ECHO_REQUEST, 0, 0x9B5D, 0x0A1B0001)
    assert isinstance(payload, memoryview)
    assert bytes(payload) == ECHO[ICMP_HLEN:]
    assert icmp_checksum_ok(ECHO)
    assert not icmp_checksum_ok(ECHO[:-1] + b"\x01")
    assert not icmp_checksum_ok(ECHO[:7])


def test_build_echo_vectors() -> None:
    assert build_icmp(IcmpType.ECHO_REQUEST, 0, 0x0A1B0001, ECHO[ICMP_HLEN:]) == ECHO
    assert build_icmpv6(Icmp6Type.ECHO_REQUEST, 0, 0x12340007, b"ping", "fd00::1", "fd00::2") == (
        ECHO6
    )
    assert icmpv6_checksum_ok(ECHO6, "fd00::1", "fd00::2")
    assert not icmpv6_checksum_ok(ECHO6, "fd00::1", "fd00::3")


def test_builders_match_scapy() -> None:
    ours = build_icmp(IcmpType.ECHO_REPLY, 0, 0x00070009, b"hello, odd")
    assert ours == bytes(ICMP(type=0, id=7, seq=9) / b"hello, odd")
    ours6 = build_icmpv6(Icmp6Type.ECHO_REQUEST, 0, 0x00010002, b"abc", "2001:db8::a", "ff02::1")
    theirs6 = IPv6(src="2001:db8::a", dst="ff02::1") / ICMPv6EchoRequest(id=1, seq=2, data=b"abc")
    assert ours6 == bytes(theirs6)[IPV6_HLEN:]


def test_round_trip() -> None:
    header, payload = parse_icmp(ECHO)
    assert build_icmp(header.type, header.code, header.rest, payload) == ECHO


def test_rest_must_be_32_bits() -> None:
    with pytest.raises(ValueError):
        build_icmp(0, 0, 1 << 32, b"")
    with pytest.raises(ValueError):
        build_icmpv6(128, 0, -1, b"", "fd00::1", "fd00::2")


def test_enum_values() -> None:
    assert [int(t) for t in IcmpType] == [0, 3, 8, 11]
    assert [int(c) for c in IcmpUnreachCode] == [0, 1, 2, 3, 4]
    assert [int(t) for t in Icmp6Type] == [1, 2, 3, 128, 129]


def test_frag_needed_error() -> None:
    mtu = 1450
    error = build_icmpv4_error(
        IcmpType.DEST_UNREACH, IcmpUnreachCode.FRAG_NEEDED, OFFENDING, GATEWAY, rest=mtu
    )
    header, message = parse_ipv4(error)
    assert header.src == ipaddress.IPv4Address(GATEWAY)
    assert header.dst == ipaddress.IPv4Address("10.244.0.2")
    assert header.protocol == IPProto.ICMP and header.ttl == 64
    assert ipv4_header_checksum_ok(error)
    assert icmp_checksum_ok(message)
    icmp, quoted = parse_icmp(message)
    assert (icmp.type, icmp.code) == (3, 4)
    assert icmp.rest & 0xFFFF == mtu
    assert bytes(quoted) == OFFENDING[: 20 + 8]  # the header and 8 bytes: the TCP ports + seq
    assert len(error) == 20 + 8 + 28

    # scapy's view: the same fields, and the checksums it recomputes agree.
    packet = IP(error)
    assert packet[ICMP].type == 3 and packet[ICMP].code == 4
    assert packet[ICMP].nexthopmtu == mtu
    assert packet[IPerror].dst == "10.244.7.9" and packet[IPerror].id == 0x4242
    assert packet[TCPerror].sport == 0xC350 and packet[TCPerror].dport == 80
    for layer in (packet[IP], packet[ICMP]):
        copy = layer.copy()
        copy.chksum = None
        assert type(layer)(bytes(copy)).chksum == layer.chksum


def test_error_quotes_options_and_respects_quote_and_ttl() -> None:
    offending = build_ipv4(
        "10.244.0.2",
        "10.244.9.9",
        IPProto.UDP,
        build_udp(1, 2, b"x" * 40),
        options=b"\x01\x01\x01\x00",
    )
    error = build_icmpv4_error(
        IcmpType.DEST_UNREACH, IcmpUnreachCode.NET, offending, GATEWAY, ttl=8, quote=16
    )
    header, message = parse_ipv4(error)
    assert header.ttl == 8
    _, quoted = parse_icmp(message)
    assert bytes(quoted) == offending[: 24 + 16]
    assert icmp_checksum_ok(message)
    assert IP(error)[UDPerror].dport == 2


def test_error_quote_clamped_to_packet() -> None:
    tiny = build_ipv4("10.244.0.2", "10.244.9.9", IPProto.UDP, b"abc")
    padded = tiny + bytes(20)  # Ethernet minimum-frame padding is not quoted
    error = build_icmpv4_error(IcmpType.DEST_UNREACH, IcmpUnreachCode.HOST, padded, GATEWAY)
    _, message = parse_ipv4(error)
    _, quoted = parse_icmp(message)
    assert bytes(quoted) == tiny
    # A truncated packet: only its header has to be whole.
    error = build_icmpv4_error(IcmpType.TIME_EXCEEDED, 0, OFFENDING[:24], GATEWAY)
    _, message = parse_ipv4(error)
    assert bytes(parse_icmp(message)[1]) == OFFENDING[:24]


@pytest.mark.parametrize(
    "offending",
    [b"", OFFENDING[:19], b"\x65" + OFFENDING[1:], b"\x44" + OFFENDING[1:], b"\x4f" + bytes(40)],
)
def test_error_rejects_non_ipv4(offending: bytes) -> None:
    with pytest.raises(DecodeError):
        build_icmpv4_error(IcmpType.DEST_UNREACH, IcmpUnreachCode.NET, offending, GATEWAY)


def test_error_rejects_negative_quote() -> None:
    with pytest.raises(ValueError):
        build_icmpv4_error(3, 0, OFFENDING, GATEWAY, quote=-1)


def _v6_packet(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    return build_ipv6(src, dst, next_header, payload)


def test_packet_too_big_v6() -> None:
    offending = _v6_packet("fd00:1::2", "fd00:7::9", IPProto.UDP, build_udp(1, 2, bytes(1400)))
    error = build_icmpv6_error(Icmp6Type.PACKET_TOO_BIG, 0, offending, "fd00:1::", rest=1430)
    assert len(error) == IPV6_MIN_MTU
    header, message = parse_ipv6(error)
    assert header.src == ipaddress.IPv6Address("fd00:1::")
    assert header.dst == ipaddress.IPv6Address("fd00:1::2")
    assert header.next_header == IPProto.ICMPV6 and header.hop_limit == 64
    assert icmpv6_checksum_ok(message, header.src, header.dst)
    icmp, quoted = parse_icmp(message)
    assert (icmp.type, icmp.code, icmp.rest) == (2, 0, 1430)
    assert bytes(quoted) == offending[: IPV6_MIN_MTU - IPV6_HLEN - ICMP_HLEN]

    packet = IPv6(error)
    assert packet[ICMPv6PacketTooBig].mtu == 1430
    copy = packet[ICMPv6PacketTooBig].copy()
    copy.cksum = None
    rebuilt = IPv6(bytes(IPv6(src=str(header.src), dst=str(header.dst)) / copy))
    assert rebuilt[ICMPv6PacketTooBig].cksum == packet[ICMPv6PacketTooBig].cksum


def test_small_v6_error_quotes_whole_packet() -> None:
    offending = _v6_packet("fd00:1::2", "fd00:7::9", IPProto.UDP, build_udp(1, 2, b"hi"))
    error = build_icmpv6_error(
        Icmp6Type.DEST_UNREACH, 0, offending + b"pad", "fd00:1::", hop_limit=9
    )
    header, message = parse_ipv6(error)
    assert header.hop_limit == 9
    assert bytes(parse_icmp(message)[1]) == offending


@pytest.mark.parametrize("offending", [b"", bytes(39), b"\x45" + bytes(60)])
def test_v6_error_rejects_non_ipv6(offending: bytes) -> None:
    with pytest.raises(DecodeError):
        build_icmpv6_error(Icmp6Type.DEST_UNREACH, 0, offending, "fd00::1")


def _v4(
    src: str = "10.244.0.2", dst: str = "10.244.7.9", proto: int = IPProto.UDP, **kw: int
) -> bytes:
    return build_ipv4(src, dst, proto, bytes(16), **kw)


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (_v4(), True),
        (_v4(proto=IPProto.TCP, flags=IP_DF), True),
        (_v4(flags=IP_MF), True),  # the first fragment is answered
        (_v4(fragment_offset=185), False),  # later fragments are not
        (_v4(proto=IPProto.ICMP), False),  # flannel never answers ICMP, echo included
        (_v4(src="0.0.0.0"), False),
        (_v4(src="127.0.0.1"), False),
        (_v4(src="224.0.0.5"), False),
        (_v4(src="255.255.255.255"), False),
        (_v4(src="240.0.0.1"), False),
        (_v4(dst="239.1.2.3"), False),
        (_v4(dst="255.255.255.255"), False),
        (b"\x45" + bytes(10), False),
        (b"\x65" + _v4()[1:], False),
    ],
)
def test_should_send_icmp_error(packet: bytes, expected: bool) -> None:
    assert should_send_icmp_error(packet) is expected


def _icmp4(icmp_type: int, **kw: int) -> bytes:
    return build_ipv4(
        "10.244.0.2", "10.244.7.9", IPProto.ICMP, build_icmp(icmp_type, 0, 0, bytes(8)), **kw
    )


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (_icmp4(IcmpType.ECHO_REQUEST), True),
        (_icmp4(IcmpType.ECHO_REPLY, flags=IP_DF), True),
        (_icmp4(13), True),  # timestamp request
        (_icmp4(IcmpType.DEST_UNREACH), False),
        (_icmp4(IcmpType.TIME_EXCEEDED), False),
        (_icmp4(4), False),  # source quench
        (_icmp4(5), False),  # redirect
        (_icmp4(12), False),  # parameter problem
        (_icmp4(IcmpType.ECHO_REQUEST, fragment_offset=1), False),
        (build_ipv4("10.244.0.2", "10.244.7.9", IPProto.ICMP, b""), False),  # no ICMP type
        (_v4(), True),
    ],
)
def test_should_send_icmp_error_allowing_queries(packet: bytes, expected: bool) -> None:
    assert should_send_icmp_error(packet, allow_icmp_queries=True) is expected
    if packet[9] == IPProto.ICMP:
        assert should_send_icmp_error(packet) is False  # flannel's default: never about ICMP


@pytest.mark.parametrize(
    ("packet", "error_type", "expected"),
    [
        (_v6_packet("fd00::2", "fd00:7::9", 17, bytes(8)), Icmp6Type.DEST_UNREACH, True),
        (_v6_packet("fd00::2", "fd00:7::9", 58, ECHO6), Icmp6Type.DEST_UNREACH, True),
        (
            _v6_packet("fd00::2", "fd00:7::9", 58, bytes([1]) + bytes(7)),
            Icmp6Type.DEST_UNREACH,
            False,
        ),
        (_v6_packet("::", "fd00:7::9", 17, bytes(8)), Icmp6Type.DEST_UNREACH, False),
        (_v6_packet("ff02::1", "fd00:7::9", 17, bytes(8)), Icmp6Type.DEST_UNREACH, False),
        (_v6_packet("fd00::2", "ff05::2", 17, bytes(8)), Icmp6Type.DEST_UNREACH, False),
        (_v6_packet("fd00::2", "ff05::2", 17, bytes(8)), Icmp6Type.PACKET_TOO_BIG, True),
        (bytes(39), Icmp6Type.DEST_UNREACH, False),
    ],
)
def test_should_send_icmpv6_error(packet: bytes, error_type: int, expected: bool) -> None:
    assert should_send_icmpv6_error(packet, error_type) is expected
