"""VXLAN (RFC 7348) as the Linux kernel and flannel speak it.

Wire layout: flags (8) | reserved (24) | VNI (24) | reserved (8). The kernel
(without GBP/GPE extensions) requires flags == I and every reserved bit
zero, and sends exactly that; VxlanHeader.valid mirrors its check.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dataplane.packet.checksum import Buffer
from dataplane.packet.errors import DecodeError

VXLAN_HLEN = 8
VXLAN_FLAG_I = 0x08
VXLAN_PORT_LINUX = 8472  # the kernel's historic default, and flannel's
VXLAN_PORT_IANA = 4789
VNI_MAX = 2**24 - 1

# Outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8, and with an IPv6 outer header.
VXLAN_OVERHEAD_V4 = 50
VXLAN_OVERHEAD_V6 = 70

# Two big-endian words: flags<<24 | reserved1, vni<<8 | reserved2.
VXLAN_STRUCT = struct.Struct("!II")
_FLAGS_WORD_I = VXLAN_FLAG_I << 24


@dataclass(frozen=True, slots=True)
class VxlanHeader:
    flags: int  # all 8 flag bits; RFC 7348 defines only I (0x08)
    vni: int
    reserved1: int = 0  # the 24 bits after the flags
    reserved2: int = 0  # the 8 bits after the VNI

    @property
    def valid(self) -> bool:
        """What the kernel accepts: the I flag alone and zero reserved fields."""
        return self.flags == VXLAN_FLAG_I and self.reserved1 == 0 and self.reserved2 == 0


def parse_vxlan(data: Buffer) -> tuple[VxlanHeader, memoryview]:
    """Decode the header; the payload (the inner Ethernet frame) is a view.

    Flags and reserved fields are reported, not judged: see VxlanHeader.valid.
    """
    if len(data) < VXLAN_HLEN:
        raise DecodeError(f"VXLAN header too short: {len(data)} < {VXLAN_HLEN} bytes")
    word0, word1 = VXLAN_STRUCT.unpack_from(data)
    header = VxlanHeader(word0 >> 24, word1 >> 8, word0 & 0xFFFFFF, word1 & 0xFF)
    return header, memoryview(data)[VXLAN_HLEN:]


def _check_vni(vni: int) -> None:
    if not 0 <= vni <= VNI_MAX:
        raise ValueError(f"VNI {vni} out of range 0..{VNI_MAX}")


def build_vxlan(vni: int, payload: Buffer = b"") -> bytes:
    _check_vni(vni)
    return VXLAN_STRUCT.pack(_FLAGS_WORD_I, vni << 8) + payload


def pack_vxlan_into(buf: bytearray | memoryview, offset: int, vni: int) -> None:
    """Write the 8-byte header at buf[offset:] (hot path: no allocation)."""
    _check_vni(vni)
    VXLAN_STRUCT.pack_into(buf, offset, _FLAGS_WORD_I, vni << 8)
