"""Ethernet II framing (no 802.1Q: the overlay devices never carry VLAN tags)."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from enum import IntEnum

from dataplane.packet.checksum import Buffer
from dataplane.packet.errors import DecodeError

ETH_HLEN = 14
ETH_ALEN = 6
BROADCAST_MAC = b"\xff" * ETH_ALEN

ETH_STRUCT = struct.Struct("!6s6sH")


class EtherType(IntEnum):
    IPV4 = 0x0800
    ARP = 0x0806
    IPV6 = 0x86DD


@dataclass(frozen=True, slots=True)
class EthernetHeader:
    dst: bytes
    src: bytes
    ethertype: int

    def pack(self) -> bytes:
        return ETH_STRUCT.pack(self.dst, self.src, self.ethertype)


def parse_ethernet(data: Buffer) -> tuple[EthernetHeader, memoryview]:
    """Split a frame into its header and payload (a view, no copy)."""
    if len(data) < ETH_HLEN:
        raise DecodeError(f"ethernet frame too short: {len(data)} < {ETH_HLEN} bytes")
    dst, src, ethertype = ETH_STRUCT.unpack_from(data)
    return EthernetHeader(dst, src, ethertype), memoryview(data)[ETH_HLEN:]


def build_ethernet(dst: Buffer, src: Buffer, ethertype: int, payload: Buffer = b"") -> bytes:
    if len(dst) != ETH_ALEN or len(src) != ETH_ALEN:
        raise ValueError("MAC addresses must be 6 bytes")
    return ETH_STRUCT.pack(bytes(dst), bytes(src), ethertype) + payload


def mac_to_str(mac: Buffer) -> str:
    """Lower-case colon form, as `ip link` and flannel's VtepMAC JSON print it."""
    if len(mac) != ETH_ALEN:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
    return bytes(mac).hex(":")


def mac_from_str(text: str) -> bytes:
    """Parse "aa:bb:cc:dd:ee:ff" (or with '-' separators) into 6 bytes."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != ETH_ALEN or not all(
        len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts
    ):
        raise ValueError(
            f"invalid MAC address {text!r}: expected six two-digit hex groups "
            "separated by ':' such as 'aa:bb:cc:dd:ee:ff'"
        )
    return bytes(int(p, 16) for p in parts)


def random_vtep_mac(rng: random.Random) -> bytes:
    """A random locally administered unicast MAC, made the way flannel's pkg/mac does."""
    mac = bytearray(rng.randbytes(ETH_ALEN))
    mac[0] = (mac[0] & 0xFE) | 0x02
    return bytes(mac)
