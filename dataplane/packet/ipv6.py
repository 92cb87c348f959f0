"""IPv6 fixed header (RFC 8200). Extension headers are left to the caller."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from dataplane.packet.checksum import Buffer
from dataplane.packet.errors import DecodeError

IPV6_HLEN = 40
IPV6_MIN_MTU = 1280

IPV6_HOP_LIMIT_OFFSET = 7
IPV6_SRC_OFFSET = 8
IPV6_DST_OFFSET = 24

IPV6_STRUCT = struct.Struct("!IHBB16s16s")

IPv6AddressLike = str | ipaddress.IPv6Address | bytes | bytearray | memoryview


def ipv6_bytes(addr: IPv6AddressLike) -> bytes:
    """16 network-order bytes from a string, an IPv6Address or 16 bytes."""
    if isinstance(addr, ipaddress.IPv6Address):
        return addr.packed
    if isinstance(addr, str):
        return ipaddress.IPv6Address(addr).packed
    if len(addr) != 16:
        raise ValueError(f"an IPv6 address is 16 bytes, got {len(addr)}")
    return bytes(addr)


@dataclass(frozen=True, slots=True)
class IPv6Header:
    traffic_class: int
    flow_label: int
    payload_length: int
    next_header: int
    hop_limit: int
    src: ipaddress.IPv6Address
    dst: ipaddress.IPv6Address


def parse_ipv6(data: Buffer) -> tuple[IPv6Header, memoryview]:
    """Decode the fixed header; payload is data[40:40+payload_length] as a view.

    Trailing bytes (Ethernet padding) are ignored. A zero payload_length
    (jumbogram) yields an empty payload: the overlay never carries jumbograms.
    """
    if len(data) < IPV6_HLEN:
        raise DecodeError(f"IPv6 packet too short: {len(data)} < {IPV6_HLEN} bytes")
    first, payload_length, next_header, hop_limit, src, dst = IPV6_STRUCT.unpack_from(data)
    version = first >> 28
    if version != 6:
        raise DecodeError(f"not IPv6: version {version}")
    end = IPV6_HLEN + payload_length
    if end > len(data):
        raise DecodeError(
            f"IPv6 payload length {payload_length} exceeds the "
            f"{len(data) - IPV6_HLEN} bytes present"
        )
    header = IPv6Header(
        (first >> 20) & 0xFF,
        first & 0xFFFFF,
        payload_length,
        next_header,
        hop_limit,
        ipaddress.IPv6Address(src),
        ipaddress.IPv6Address(dst),
    )
    return header, memoryview(data)[IPV6_HLEN:end]


def build_ipv6(
    src: IPv6AddressLike,
    dst: IPv6AddressLike,
    next_header: int,
    payload: Buffer,
    *,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    if not 0 <= traffic_class <= 0xFF:
        raise ValueError(f"IPv6 traffic class {traffic_class} out of range 0..255")
    if not 0 <= flow_label <= 0xFFFFF:
        raise ValueError(f"IPv6 flow label {flow_label} out of range 0..2**20-1")
    if len(payload) > 0xFFFF:
        raise ValueError(f"IPv6 payload too long for a non-jumbo packet: {len(payload)} bytes")
    first = 6 << 28 | traffic_class << 20 | flow_label
    header = IPV6_STRUCT.pack(
        first, len(payload), next_header, hop_limit, ipv6_bytes(src), ipv6_bytes(dst)
    )
    return header + payload
