"""ICMPv4 (RFC 792) and ICMPv6 (RFC 4443), and the error packets the forwarder sends."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from dataplane.packet.checksum import (
    Buffer,
    internet_checksum,
    ones_complement_sum,
    pseudo_header_sum_v6,
)
from dataplane.packet.errors import DecodeError
from dataplane.packet.ipv4 import (
    IP_OFFSET_MASK,
    IPV4_HLEN,
    IPV4_SRC_OFFSET,
    IPProto,
    IPv4AddressLike,
    build_ipv4,
)
from dataplane.packet.ipv6 import (
    IPV6_HLEN,
    IPV6_MIN_MTU,
    IPV6_SRC_OFFSET,
    IPv6AddressLike,
    build_ipv6,
    ipv6_bytes,
)

ICMP_HLEN = 8
ICMP_CHECKSUM_OFFSET = 2
# What flannel's C proxy (and RFC 792) quotes after the offending IP header.
ICMP_QUOTE_PAYLOAD = 8

ICMP_STRUCT = struct.Struct("!BBHI")


class IcmpType(IntEnum):
    ECHO_REPLY = 0
    DEST_UNREACH = 3
    ECHO_REQUEST = 8
    TIME_EXCEEDED = 11


class IcmpUnreachCode(IntEnum):
    NET = 0
    HOST = 1
    PROTOCOL = 2
    PORT = 3
    FRAG_NEEDED = 4


class Icmp6Type(IntEnum):
    DEST_UNREACH = 1
    PACKET_TOO_BIG = 2
    TIME_EXCEEDED = 3
    ECHO_REQUEST = 128
    ECHO_REPLY = 129


@dataclass(frozen=True, slots=True)
class IcmpHeader:
    type: int
    code: int
    checksum: int
    rest: int  # the 32-bit word after the checksum (id/seq, MTU, unused)


def parse_icmp(data: Buffer) -> tuple[IcmpHeader, memoryview]:
    """Decode the 8-byte ICMP or ICMPv6 header. The checksum is not verified."""
    if len(data) < ICMP_HLEN:
        raise DecodeError(f"ICMP message too short: {len(data)} < {ICMP_HLEN} bytes")
    type_, code, checksum, rest = ICMP_STRUCT.unpack_from(data)
    return IcmpHeader(type_, code, checksum, rest), memoryview(data)[ICMP_HLEN:]


def _check_rest(rest: int) -> None:
    if not 0 <= rest <= 0xFFFFFFFF:
        raise ValueError(f"ICMP rest-of-header {rest} is not a 32-bit value")


def build_icmp(type: int, code: int, rest: int, payload: Buffer) -> bytes:
    """An ICMPv4 message with its checksum (over the message only, no pseudo-header)."""
    _check_rest(rest)
    header = ICMP_STRUCT.pack(type, code, 0, rest)
    csum = internet_checksum(payload, ones_complement_sum(header))
    return ICMP_STRUCT.pack(type, code, csum, rest) + payload


def build_icmpv6(
    type: int,
    code: int,
    rest: int,
    payload: Buffer,
    src: IPv6AddressLike,
    dst: IPv6AddressLike,
) -> bytes:
    """An ICMPv6 message with its checksum over the IPv6 pseudo-header."""
    _check_rest(rest)
    length = ICMP_HLEN + len(payload)
    header = ICMP_STRUCT.pack(type, code, 0, rest)
    pseudo = pseudo_header_sum_v6(ipv6_bytes(src), ipv6_bytes(dst), IPProto.ICMPV6, length)
    csum = internet_checksum(payload, ones_complement_sum(header, pseudo))
    return ICMP_STRUCT.pack(type, code, csum, rest) + payload


def icmp_checksum_ok(message: Buffer) -> bool:
    """True if an ICMPv4 message (header + payload) sums to 0xFFFF."""
    return len(message) >= ICMP_HLEN and ones_complement_sum(message) == 0xFFFF


def icmpv6_checksum_ok(message: Buffer, src: IPv6AddressLike, dst: IPv6AddressLike) -> bool:
    """True if an ICMPv6 message sums to 0xFFFF with its pseudo-header."""
    if len(message) < ICMP_HLEN:
        return False
    pseudo = pseudo_header_sum_v6(ipv6_bytes(src), ipv6_bytes(dst), IPProto.ICMPV6, len(message))
    return ones_complement_sum(message, pseudo) == 0xFFFF


def _ipv4_header_length(packet: Buffer) -> int:
    """ihl*4 of a packet that at least starts with a whole IPv4 header, else DecodeError."""
    if len(packet) < IPV4_HLEN:
        raise DecodeError(f"offending packet too short for IPv4: {len(packet)} bytes")
    if packet[0] >> 4 != 4:
        raise DecodeError(f"offending packet is not IPv4: version {packet[0] >> 4}")
    hlen = (packet[0] & 0x0F) * 4
    if hlen < IPV4_HLEN or hlen > len(packet):
        raise DecodeError(f"offending packet has a bad IPv4 header length {hlen}")
    return hlen


def build_icmpv4_error(
    type: int,
    code: int,
    offending: Buffer,
    src: IPv4AddressLike,
    *,
    rest: int = 0,
    ttl: int = 64,
    quote: int = ICMP_QUOTE_PAYLOAD,
) -> bytes:
    """A complete IPv4 packet carrying an ICMP error from `src` back to the offending source.

    The ICMP payload quotes the offending IP header (with options) and the
    first `quote` bytes of its payload, as flannel's C proxy does (RFC 792);
    fewer if the packet is shorter. For DEST_UNREACH/FRAG_NEEDED pass the
    next-hop MTU in the low 16 bits of `rest` (RFC 1191).
    Only the header of `offending` has to be well-formed; it may be truncated.
    """
    if quote < 0:
        raise ValueError(f"quote must be >= 0, got {quote}")
    hlen = _ipv4_header_length(offending)
    end = min(hlen + quote, len(offending))
    total_length = offending[2] << 8 | offending[3]
    if total_length >= hlen:
        end = min(end, total_length)  # don't quote Ethernet padding
    quoted = bytes(memoryview(offending)[:end])
    dst = bytes(memoryview(offending)[IPV4_SRC_OFFSET : IPV4_SRC_OFFSET + 4])
    return build_ipv4(src, dst, IPProto.ICMP, build_icmp(type, code, rest, quoted), ttl=ttl)


def build_icmpv6_error(
    type: int,
    code: int,
    offending: Buffer,
    src: IPv6AddressLike,
    *,
    rest: int = 0,
    hop_limit: int = 64,
) -> bytes:
    """A complete IPv6 packet carrying an ICMPv6 error from `src` back to the offending source.

    Quotes as much of the offending packet as keeps the result within the
    IPv6 minimum MTU of 1280 bytes (RFC 4443 section 2.4 c). For
    PACKET_TOO_BIG, `rest` is the MTU.
    """
    if len(offending) < IPV6_HLEN:
        raise DecodeError(f"offending packet too short for IPv6: {len(offending)} bytes")
    if offending[0] >> 4 != 6:
        raise DecodeError(f"offending packet is not IPv6: version {offending[0] >> 4}")
    end = min(len(offending), IPV6_HLEN + (offending[4] << 8 | offending[5]))
    end = min(end, IPV6_MIN_MTU - IPV6_HLEN - ICMP_HLEN)
    quoted = bytes(memoryview(offending)[:end])
    dst = bytes(memoryview(offending)[IPV6_SRC_OFFSET : IPV6_SRC_OFFSET + 16])
    message = build_icmpv6(type, code, rest, quoted, src, dst)
    return build_ipv6(src, dst, IPProto.ICMPV6, message, hop_limit=hop_limit)


def _v4_is_host_address(addr: int) -> bool:
    """False for addresses that don't name a single host (RFC 1122 3.2.2)."""
    first = addr >> 24
    return addr != 0 and first != 127 and first < 224  # 224/4 multicast, 240/4 + broadcast


# ICMPv4 error messages (RFC 1122 3.2.2): never answered with another error.
_ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})


def should_send_icmp_error(packet: Buffer, *, allow_icmp_queries: bool = False) -> bool:
    """Whether an IPv4 packet the forwarder can't deliver deserves an ICMP error.

    By default no error about any ICMP packet, echo included: flannel's proxy
    never answers ICMP with ICMP (RFC 792's loop rule, applied broadly), and
    weft matches it. allow_icmp_queries=True narrows that to RFC 1122's rule
    (no error about an ICMP *error*), for errors flannel never sends, such as
    FRAG_NEEDED, where `ping -M do` should learn the path MTU like it would
    from the kernel. Never for non-first fragments, nor when the source is not
    a single host or the destination is multicast/broadcast (RFC 1122
    3.2.2). Unparseable packets get none either.
    """
    try:
        hlen = _ipv4_header_length(packet)
    except DecodeError:
        return False
    if (packet[6] << 8 | packet[7]) & IP_OFFSET_MASK:
        return False
    if packet[9] == IPProto.ICMP and (
        not allow_icmp_queries or len(packet) <= hlen or packet[hlen] in _ICMP_ERROR_TYPES
    ):
        return False
    src = int.from_bytes(packet[12:16], "big")
    dst = int.from_bytes(packet[16:20], "big")
    return _v4_is_host_address(src) and dst >> 28 != 0xE and dst != 0xFFFFFFFF


def should_send_icmpv6_error(packet: Buffer, error_type: int) -> bool:
    """The RFC 4443 section 2.4 (e) rules for an IPv6 packet, given the error to send.

    Not about an ICMPv6 error message (types < 128; only checked when ICMPv6
    directly follows the fixed header), not to an unspecified or multicast
    source, and to a multicast destination only PACKET_TOO_BIG.
    """
    if len(packet) < IPV6_HLEN or packet[0] >> 4 != 6:
        return False
    if packet[6] == IPProto.ICMPV6 and len(packet) > IPV6_HLEN and packet[IPV6_HLEN] < 128:
        return False
    src_first = packet[IPV6_SRC_OFFSET]
    if src_first == 0xFF or not any(packet[IPV6_SRC_OFFSET : IPV6_SRC_OFFSET + 16]):
        return False
    dst_multicast = packet[IPV6_SRC_OFFSET + 16] == 0xFF
    return not dst_multicast or error_type == Icmp6Type.PACKET_TOO_BIG
