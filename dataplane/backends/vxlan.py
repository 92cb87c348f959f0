"""VXLAN as the Linux kernel and flanneld speak it (RFC 7348).

On the wire: outer IPv4 / UDP to the peer's public IP, port 8472 by default,
then 8 bytes of VXLAN header (flags 0x08, 24-bit VNI), then an inner Ethernet
frame from our VtepMAC to the peer's VtepMAC. The kernel adds the outer IP and
UDP headers when we send on a UDP socket, so encap writes 8 + 14 bytes (TUN) or
8 bytes (TAP, where the kernel already built the inner Ethernet frame).
"""

from __future__ import annotations

import struct
from typing import ClassVar, Literal

from dataplane.backends.base import Backend, DropReason
from dataplane.peers import Peer

VXLAN_PORT = 8472  # the Linux vxlan module's default, which flannel uses (IANA's is 4789)
VXLAN_FLAGS_WORD = 0x08000000  # I flag set, every reserved bit zero
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD

# VXLAN header followed by the inner Ethernet header, written with one pack_into.
_VXLAN_ETH = struct.Struct("!II6s6sH")
_VXLAN = struct.Struct("!II")


class VxlanBackend(Backend):
    name: ClassVar[str] = "vxlan"
    overhead: ClassVar[int] = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
    transport: ClassVar[Literal["udp", "packet"]] = "udp"

    def __init__(self, vni: int, vtep_mac: bytes, *, port: int = VXLAN_PORT, l2: bool = False):
        if not 0 <= vni < 1 << 24:
            raise ValueError(f"VNI {vni} is outside 0..16777215")
        if len(vtep_mac) != 6:
            raise ValueError("VtepMAC must be 6 bytes")
        self.vni = vni
        self.vtep_mac = bytes(vtep_mac)
        self.port = port or VXLAN_PORT
        self.l2_device = l2
        self._vni_word = vni << 8

    @property
    def headroom(self) -> int:
        return 8 if self.l2_device else 22

    def encap(self, buf: bytearray, start: int, end: int, peer: Peer) -> int:
        if self.l2_device:
            start -= 8
            _VXLAN.pack_into(buf, start, VXLAN_FLAGS_WORD, self._vni_word)
            return start
        mac = peer.vtep_mac
        if mac is None:
            return -DropReason.UNKNOWN_MAC
        ethertype = _ETH_P_IP if buf[start] >> 4 == 4 else _ETH_P_IPV6
        start -= 22
        _VXLAN_ETH.pack_into(
            buf, start, VXLAN_FLAGS_WORD, self._vni_word, mac, self.vtep_mac, ethertype
        )
        return start

    def decap(self, buf: bytearray, end: int) -> int:
        if end < 22:
            return -DropReason.TRUNCATED
        flags, vni_word = _VXLAN.unpack_from(buf, 0)
        if flags != VXLAN_FLAGS_WORD or vni_word & 0xFF:
            # The kernel drops unknown flag bits too (we do not speak GBP or GPE).
            return -DropReason.BAD_FLAGS
        if vni_word != self._vni_word:
            return -DropReason.WRONG_VNI
        # Inner destination must be our VtepMAC: peers address us by the MAC in our lease.
        if buf[8:14] != self.vtep_mac:
            return -DropReason.UNKNOWN_MAC
        if self.l2_device:
            return 8
        ethertype = (buf[20] << 8) | buf[21]
        if ethertype != _ETH_P_IP and ethertype != _ETH_P_IPV6:
            return -DropReason.BAD_ETHERTYPE
        return 22

    def lease_data(self) -> tuple[str | None, dict[str, object] | None]:
        mac = ":".join(f"{b:02x}" for b in self.vtep_mac)
        return "vxlan", {"VNI": self.vni, "VtepMAC": mac}
