"""virtio_net_hdr: the header a TUN/TAP fd opened with IFF_VNET_HDR puts in front
of every packet, in both directions (include/uapi/linux/virtio_net.h).

    offset size
    0      1    flags        NEEDS_CSUM (1), DATA_VALID (2), RSC_INFO (4), UDP_TUNNEL_CSUM (8)
    1      1    gso_type     NONE 0, TCPV4 1, UDP 3, TCPV6 4, UDP_L4 5, | ECN 0x80,
                             | UDP_TUNNEL_IPV4 0x20 / UDP_TUNNEL_IPV6 0x40 (outer family)
    2      2    hdr_len      headers before the first segment's payload (a hint)
    4      2    gso_size     payload bytes per segment (the MSS for TCP)
    6      2    csum_start   where the checksum covered by NEEDS_CSUM starts
    8      2    csum_offset  where, after csum_start, the checksum field sits (TCP 16, UDP 6)
    -- 10 bytes: the legacy header, TUN's default size --
    10     2    num_buffers  (virtio_net_hdr_mrg_rxbuf)
    12     4    hash_value   (virtio_net_hdr_v1_hash)
    16     2    hash_report
    18     2    padding
    20     2    outer_th_offset  UDP tunnel GSO: where the outer UDP header starts
    22     2    inner_nh_offset  UDP tunnel GSO: where the inner IP header starts
    -- 24 bytes: virtio_net_hdr_v1_hash_tunnel (TUNSETVNETHDRSZ 24, Linux 6.17+) --

Multi-byte fields are little-endian: weft sets TUNSETVNETLE on its fds, and
the tunnel offsets are little-endian by definition. All offsets count from
the first byte after the virtio header (the Ethernet header on a TAP, the IP
header on a TUN).

NEEDS_CSUM means the checksum at csum_start + csum_offset is not filled in:
the field holds the folded pseudo-header sum (not complemented), and whoever
finishes the packet sums csum_start..end into it. GSO packets always carry it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from dataplane.packet.checksum import Buffer, ones_complement_sum
from dataplane.packet.errors import DecodeError

VNET_HDR_LEN = 10  # struct virtio_net_hdr (TUN's default vnet header size)
VNET_HDR_TUNNEL_LEN = 24  # struct virtio_net_hdr_v1_hash_tunnel
TUNNEL_OFFSETS_AT = 20  # outer_th_offset, inner_nh_offset live at bytes 20 and 22

TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6


class VnetFlag(IntFlag):
    NEEDS_CSUM = 0x01
    DATA_VALID = 0x02
    RSC_INFO = 0x04
    UDP_TUNNEL_CSUM = 0x08


class GsoType(IntEnum):
    """The base GSO type (low bits of gso_type); ECN and tunnel bits are separate."""

    NONE = 0
    TCPV4 = 1
    UDP = 3  # UFO, never produced by weft
    TCPV6 = 4
    UDP_L4 = 5  # USO


GSO_ECN = 0x80
GSO_UDP_TUNNEL_IPV4 = 0x20
GSO_UDP_TUNNEL_IPV6 = 0x40
GSO_UDP_TUNNEL = GSO_UDP_TUNNEL_IPV4 | GSO_UDP_TUNNEL_IPV6
_GSO_BASE_MASK = 0xFF & ~(GSO_ECN | GSO_UDP_TUNNEL)

VNET_STRUCT = struct.Struct("<BBHHHH")
VNET_TUNNEL_STRUCT = struct.Struct("<BBHHHHHIHHHH")  # … num_buffers, hash, report, pad, offsets
assert VNET_STRUCT.size == VNET_HDR_LEN and VNET_TUNNEL_STRUCT.size == VNET_HDR_TUNNEL_LEN

#: An all-zero header: "a plain packet, checksums complete" (what a non-GSO write carries).
ZERO_VNET = bytes(VNET_HDR_LEN)


@dataclass(frozen=True, slots=True)
class VnetHeader:
    flags: int = 0
    gso_type: int = GsoType.NONE  # the whole byte: base type | ECN | tunnel bits
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    outer_th_offset: int = 0  # tunnel header only
    inner_nh_offset: int = 0  # tunnel header only

    @property
    def base_gso_type(self) -> int:
        return self.gso_type & _GSO_BASE_MASK

    @property
    def is_gso(self) -> bool:
        return self.base_gso_type != GsoType.NONE

    @property
    def ecn(self) -> bool:
        return bool(self.gso_type & GSO_ECN)

    @property
    def tunnel(self) -> int:
        """GSO_UDP_TUNNEL_IPV4 / _IPV6 bits (0: not a tunnel GSO packet)."""
        return self.gso_type & GSO_UDP_TUNNEL

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & VnetFlag.NEEDS_CSUM)


def parse_vnet(data: Buffer, *, size: int = VNET_HDR_LEN) -> tuple[VnetHeader, memoryview]:
    """Decode a 10-byte (or, with size=24, the tunnel) header; the packet after it is a view.

    Sizes other than 10 and 24 (12, 20: mrg_rxbuf, hash) are accepted: the
    fields after the first ten bytes are then not decoded.
    """
    if size < VNET_HDR_LEN:
        raise ValueError(f"vnet header size {size} < {VNET_HDR_LEN}")
    if len(data) < size:
        raise DecodeError(f"vnet header too short: {len(data)} < {size} bytes")
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_STRUCT.unpack_from(data)
    outer = inner = 0
    if size >= VNET_HDR_TUNNEL_LEN:
        outer, inner = struct.unpack_from("<HH", data, TUNNEL_OFFSETS_AT)
    header = VnetHeader(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, outer, inner)
    return header, memoryview(data)[size:]


def build_vnet(header: VnetHeader, *, size: int = VNET_HDR_LEN) -> bytes:
    """Encode `header` in `size` bytes (10, or 24 with the tunnel offsets; others zero-padded)."""
    buf = bytearray(size)
    pack_vnet_into(
        buf,
        0,
        header.flags,
        header.gso_type,
        header.hdr_len,
        header.gso_size,
        header.csum_start,
        header.csum_offset,
        header.outer_th_offset if size >= VNET_HDR_TUNNEL_LEN else None,
        header.inner_nh_offset,
    )
    return bytes(buf)


def pack_vnet_into(
    buf: bytearray | memoryview,
    offset: int,
    flags: int,
    gso_type: int,
    hdr_len: int,
    gso_size: int,
    csum_start: int,
    csum_offset: int,
    outer_th_offset: int | None = None,
    inner_nh_offset: int = 0,
) -> None:
    """Write the header at buf[offset:]: 10 bytes, or 24 when outer_th_offset is given
    (then bytes 10..19 — num_buffers and the hash fields — are zeroed)."""
    if outer_th_offset is None:
        VNET_STRUCT.pack_into(
            buf, offset, flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
        )
    else:
        VNET_TUNNEL_STRUCT.pack_into(
            buf, offset, flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
            0, 0, 0, 0, outer_th_offset, inner_nh_offset,
        )  # fmt: skip


def complete_checksum(packet: bytearray | memoryview, csum_start: int, csum_offset: int) -> None:
    """Do what NEEDS_CSUM asks, in place: sum packet[csum_start:] (the field holds the
    pseudo-header sum) and store the complement at csum_start + csum_offset.

    A result of 0 is stored as 0xFFFF, as the kernel's skb_checksum_help does
    (for UDP 0 would mean "no checksum"; for TCP both are the same value).
    """
    at = csum_start + csum_offset
    if csum_start < 0 or at + 2 > len(packet):
        raise DecodeError(f"checksum field {csum_start}+{csum_offset} outside {len(packet)} bytes")
    csum = ~ones_complement_sum(packet[csum_start:]) & 0xFFFF
    if csum == 0:
        csum = 0xFFFF
    packet[at] = csum >> 8
    packet[at + 1] = csum & 0xFF


_GSO_UDP_L4 = int(GsoType.UDP_L4)  # a plain int: compared once per super-packet


def gso_l4(buf: bytearray | memoryview, l4: int, gso_type: int) -> tuple[int, int]:
    """(header length, checksum field offset) of a super-packet's transport header
    at buf[l4:]: UDP's for a UDP super-packet (USO), else TCP's (its data offset)."""
    if gso_type == _GSO_UDP_L4:
        return 8, UDP_CSUM_OFFSET
    return (buf[l4 + 12] >> 4) << 2, TCP_CSUM_OFFSET
