"""UDP (RFC 768), with the IPv4 or IPv6 pseudo-header checksum."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from dataplane.packet.checksum import (
    Buffer,
    ones_complement_sum,
    pseudo_header_sum_v4,
    pseudo_header_sum_v6,
)
from dataplane.packet.errors import DecodeError
from dataplane.packet.ipv4 import IPProto, IPv4AddressLike, ipv4_bytes
from dataplane.packet.ipv6 import IPv6AddressLike, ipv6_bytes

UDP_HLEN = 8
UDP_CHECKSUM_OFFSET = 6

UDP_STRUCT = struct.Struct("!HHHH")

AddressLike = IPv4AddressLike | IPv6AddressLike


@dataclass(frozen=True, slots=True)
class UDPHeader:
    src_port: int
    dst_port: int
    length: int
    checksum: int


def parse_udp(data: Buffer) -> tuple[UDPHeader, memoryview]:
    """Decode a UDP header; payload is data[8:length] as a view. Checksum not verified."""
    if len(data) < UDP_HLEN:
        raise DecodeError(f"UDP datagram too short: {len(data)} < {UDP_HLEN} bytes")
    src_port, dst_port, length, checksum = UDP_STRUCT.unpack_from(data)
    if not UDP_HLEN <= length <= len(data):
        raise DecodeError(f"UDP length {length} outside {UDP_HLEN}..{len(data)} bytes")
    return UDPHeader(src_port, dst_port, length, checksum), memoryview(data)[UDP_HLEN:length]


def _address_pair(src_ip: AddressLike, dst_ip: AddressLike) -> tuple[bytes, bytes]:
    """Both addresses as packed bytes of the same family (4 or 16 bytes)."""
    src = _packed(src_ip)
    dst = _packed(dst_ip)
    if len(src) != len(dst):
        raise ValueError("source and destination addresses are of different families")
    return src, dst


def _packed(addr: AddressLike) -> bytes:
    if isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return addr.packed
    if isinstance(addr, str):
        return ipaddress.ip_address(addr).packed
    return ipv4_bytes(addr) if len(addr) == 4 else ipv6_bytes(addr)


def _pseudo_sum(src: bytes, dst: bytes, length: int) -> int:
    if len(src) == 4:
        return pseudo_header_sum_v4(src, dst, IPProto.UDP, length)
    return pseudo_header_sum_v6(src, dst, IPProto.UDP, length)


def build_udp(
    src_port: int,
    dst_port: int,
    payload: Buffer,
    src_ip: AddressLike | None = None,
    dst_ip: AddressLike | None = None,
) -> bytes:
    """A UDP datagram. With both addresses the checksum covers the pseudo-header
    of their family; without them it is 0 ("no checksum", legal over IPv4 only,
    and what the Linux kernel sends for VXLAN over IPv4 by default).
    """
    length = UDP_HLEN + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"UDP datagram too long: {length} bytes")
    if (src_ip is None) != (dst_ip is None):
        raise ValueError("give both src_ip and dst_ip for a checksum, or neither")
    if src_ip is None or dst_ip is None:
        return UDP_STRUCT.pack(src_port, dst_port, length, 0) + payload
    src, dst = _address_pair(src_ip, dst_ip)
    header = UDP_STRUCT.pack(src_port, dst_port, length, 0)
    csum = ~ones_complement_sum(payload, ones_complement_sum(header, _pseudo_sum(src, dst, length)))
    # 0 on the wire means "no checksum", so a computed 0 is sent as 0xFFFF.
    csum = csum & 0xFFFF or 0xFFFF
    return UDP_STRUCT.pack(src_port, dst_port, length, csum) + payload


def udp_checksum_ok(
    datagram: Buffer,
    src_ip: AddressLike,
    dst_ip: AddressLike,
    *,
    zero_ok_v6: bool = False,
) -> bool:
    """Verify the checksum of a UDP datagram (header + payload, trailing bytes ignored).

    A zero checksum means "none" and is accepted over IPv4; over IPv6 it is
    invalid (RFC 8200) unless zero_ok_v6 (RFC 6935 tunnels, the kernel's
    udp6zerocsumrx). False for a datagram parse_udp would reject.
    """
    if len(datagram) < UDP_HLEN:
        return False
    length = datagram[4] << 8 | datagram[5]
    if not UDP_HLEN <= length <= len(datagram):
        return False
    src, dst = _address_pair(src_ip, dst_ip)
    if datagram[6] == 0 and datagram[7] == 0:
        return len(src) == 4 or zero_ok_v6
    total = ones_complement_sum(memoryview(datagram)[:length], _pseudo_sum(src, dst, length))
    return total == 0xFFFF
