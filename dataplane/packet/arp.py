"""ARP for IPv4 over Ethernet (RFC 826), the only kind the overlay answers."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from dataplane.packet.checksum import Buffer
from dataplane.packet.errors import DecodeError
from dataplane.packet.ethernet import ETH_ALEN, EtherType
from dataplane.packet.ipv4 import IPv4AddressLike, ipv4_bytes

ARP_LEN = 28
ARP_HTYPE_ETHERNET = 1

ARP_STRUCT = struct.Struct("!HHBBH6s4s6s4s")


class ArpOp(IntEnum):
    REQUEST = 1
    REPLY = 2


@dataclass(frozen=True, slots=True)
class ArpPacket:
    op: int
    sender_mac: bytes
    sender_ip: bytes
    target_mac: bytes
    target_ip: bytes

    @property
    def sender_address(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.sender_ip)

    @property
    def target_address(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.target_ip)


def parse_arp(data: Buffer) -> ArpPacket:
    """Decode an Ethernet/IPv4 ARP packet; bytes past the 28 (frame padding) are ignored.

    `op` is an ArpOp when known, otherwise the raw int (e.g. InARP 8/9), so
    the caller decides what to ignore.
    """
    if len(data) < ARP_LEN:
        raise DecodeError(f"ARP packet too short: {len(data)} < {ARP_LEN} bytes")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = ARP_STRUCT.unpack_from(data)
    if htype != ARP_HTYPE_ETHERNET or ptype != EtherType.IPV4 or hlen != ETH_ALEN or plen != 4:
        raise DecodeError(
            f"not Ethernet/IPv4 ARP: htype={htype} ptype={ptype:#06x} hlen={hlen} plen={plen}"
        )
    if op in ArpOp._value2member_map_:
        op = ArpOp(op)
    return ArpPacket(op, sha, spa, tha, tpa)


def build_arp(
    op: int,
    sender_mac: Buffer,
    sender_ip: IPv4AddressLike,
    target_mac: Buffer,
    target_ip: IPv4AddressLike,
) -> bytes:
    """28 bytes of ARP (put it in an Ethernet frame with EtherType.ARP)."""
    if len(sender_mac) != ETH_ALEN or len(target_mac) != ETH_ALEN:
        raise ValueError("MAC addresses must be 6 bytes")
    return ARP_STRUCT.pack(
        ARP_HTYPE_ETHERNET,
        EtherType.IPV4,
        ETH_ALEN,
        4,
        op,
        bytes(sender_mac),
        ipv4_bytes(sender_ip),
        bytes(target_mac),
        ipv4_bytes(target_ip),
    )
