"""IPv4 header (RFC 791)."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from dataplane.packet.checksum import Buffer, ones_complement_sum
from dataplane.packet.errors import DecodeError

IPV4_HLEN = 20
IPV4_MAX_HLEN = 60

IP_DF = 0x4000
IP_MF = 0x2000
IP_FLAGS_MASK = 0xE000
IP_OFFSET_MASK = 0x1FFF

# Byte offsets the forwarder patches or reads in place.
IPV4_TTL_OFFSET = 8
IPV4_PROTOCOL_OFFSET = 9
IPV4_CHECKSUM_OFFSET = 10
IPV4_SRC_OFFSET = 12
IPV4_DST_OFFSET = 16

IPV4_STRUCT = struct.Struct("!BBHHHBBH4s4s")

IPv4AddressLike = str | ipaddress.IPv4Address | bytes | bytearray | memoryview


class IPProto(IntEnum):
    ICMP = 1
    TCP = 6
    UDP = 17
    ICMPV6 = 58


def ipv4_bytes(addr: IPv4AddressLike) -> bytes:
    """4 network-order bytes from a dotted string, an IPv4Address or 4 bytes."""
    if isinstance(addr, ipaddress.IPv4Address):
        return addr.packed
    if isinstance(addr, str):
        return ipaddress.IPv4Address(addr).packed
    if len(addr) != 4:
        raise ValueError(f"an IPv4 address is 4 bytes, got {len(addr)}")
    return bytes(addr)


@dataclass(frozen=True, slots=True)
class IPv4Header:
    tos: int
    total_length: int
    identification: int
    flags: int  # IP_DF / IP_MF bits, in place (0xE000 mask)
    fragment_offset: int  # in 8-byte units, as on the wire
    ttl: int
    protocol: int
    checksum: int
    src: ipaddress.IPv4Address
    dst: ipaddress.IPv4Address
    options: bytes = b""

    @property
    def header_length(self) -> int:
        return IPV4_HLEN + len(self.options)

    @property
    def dont_fragment(self) -> bool:
        return bool(self.flags & IP_DF)

    @property
    def more_fragments(self) -> bool:
        return bool(self.flags & IP_MF)

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags & IP_MF) or self.fragment_offset != 0


def parse_ipv4(data: Buffer) -> tuple[IPv4Header, memoryview]:
    """Decode an IPv4 header; payload is data[ihl*4:total_length] as a view.

    Bytes past total_length (Ethernet minimum-frame padding) are ignored. The
    header checksum is not verified here: see ipv4_header_checksum_ok.
    """
    if len(data) < IPV4_HLEN:
        raise DecodeError(f"IPv4 packet too short: {len(data)} < {IPV4_HLEN} bytes")
    (ver_ihl, tos, total_length, ident, frag, ttl, proto, csum, src, dst) = IPV4_STRUCT.unpack_from(
        data
    )
    version = ver_ihl >> 4
    if version != 4:
        raise DecodeError(f"not IPv4: version {version}")
    hlen = (ver_ihl & 0x0F) * 4
    if hlen < IPV4_HLEN:
        raise DecodeError(f"IPv4 header length {hlen} < {IPV4_HLEN}")
    if not hlen <= total_length <= len(data):
        raise DecodeError(
            f"IPv4 total length {total_length} outside header length {hlen}..{len(data)} bytes"
        )
    view = memoryview(data)
    header = IPv4Header(
        tos,
        total_length,
        ident,
        frag & IP_FLAGS_MASK,
        frag & IP_OFFSET_MASK,
        ttl,
        proto,
        csum,
        ipaddress.IPv4Address(src),
        ipaddress.IPv4Address(dst),
        bytes(view[IPV4_HLEN:hlen]),
    )
    return header, view[hlen:total_length]


def ipv4_header_checksum_ok(data: Buffer) -> bool:
    """True if the header (ihl*4 bytes from the start) sums to 0xFFFF."""
    if len(data) < IPV4_HLEN:
        return False
    hlen = (data[0] & 0x0F) * 4
    if hlen < IPV4_HLEN or hlen > len(data):
        return False
    return ones_complement_sum(memoryview(data)[:hlen]) == 0xFFFF


def build_ipv4(
    src: IPv4AddressLike,
    dst: IPv4AddressLike,
    protocol: int,
    payload: Buffer,
    *,
    ttl: int = 64,
    identification: int = 0,
    flags: int = 0,
    tos: int = 0,
    fragment_offset: int = 0,
    options: Buffer = b"",
) -> bytes:
    """A complete IPv4 packet with a correct header checksum.

    `flags` is IP_DF and/or IP_MF; `fragment_offset` is in 8-byte units.
    `options` must already be padded to a multiple of 4 bytes.
    """
    if flags & ~IP_FLAGS_MASK:
        raise ValueError(f"IPv4 flags {flags:#x} outside mask {IP_FLAGS_MASK:#x}")
    if not 0 <= fragment_offset <= IP_OFFSET_MASK:
        raise ValueError(f"IPv4 fragment offset {fragment_offset} out of range")
    if len(options) % 4 or len(options) > IPV4_MAX_HLEN - IPV4_HLEN:
        raise ValueError(f"IPv4 options must be a multiple of 4 bytes up to 40, got {len(options)}")
    hlen = IPV4_HLEN + len(options)
    total_length = hlen + len(payload)
    if total_length > 0xFFFF:
        raise ValueError(f"IPv4 packet too long: {total_length} bytes")
    header = bytearray(hlen)
    IPV4_STRUCT.pack_into(
        header,
        0,
        0x40 | hlen >> 2,
        tos,
        total_length,
        identification,
        flags | fragment_offset,
        ttl,
        protocol,
        0,
        ipv4_bytes(src),
        ipv4_bytes(dst),
    )
    header[IPV4_HLEN:] = options
    csum = ~ones_complement_sum(header) & 0xFFFF
    header[IPV4_CHECKSUM_OFFSET] = csum >> 8
    header[IPV4_CHECKSUM_OFFSET + 1] = csum & 0xFF
    return bytes(header) + payload


def ipv4_decrement_ttl(packet: bytearray | memoryview, offset: int = 0) -> int:
    """Decrement the TTL of the IPv4 header at `offset` in place, patching its checksum.

    Returns the new TTL; when the TTL is already 0 or 1 the packet is left
    untouched and 0 is returned (the caller drops it / sends Time Exceeded).
    """
    t = offset + IPV4_TTL_OFFSET
    ttl = packet[t]
    if ttl <= 1:
        return 0
    # As the kernel's ip_decrease_ttl: the TTL is the high byte of its header word,
    # so the checksum goes up by 0x0100 (one's complement, end-around carry).
    c = offset + IPV4_CHECKSUM_OFFSET
    check = (packet[c] << 8 | packet[c + 1]) + 0x0100
    check += check >= 0xFFFF
    packet[t] = ttl - 1
    packet[c] = (check >> 8) & 0xFF
    packet[c + 1] = check & 0xFF
    return ttl - 1
