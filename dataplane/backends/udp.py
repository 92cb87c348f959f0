"""flannel's original backend: the raw IP packet is the UDP payload (port 8285).

As flannel's C proxy does, the TTL is decremented on the way out and on the
way in (with an incremental checksum fix), and a packet whose TTL runs out
is dropped.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from dataplane.backends.base import Backend, DropReason
from dataplane.peers import Peer

UDP_PORT = 8285


def decrement_ttl(buf: bytearray, start: int) -> bool:
    """Decrement the IPv4 TTL / IPv6 hop limit at buf[start]; False when it runs out."""
    if buf[start] >> 4 == 4:
        ttl = buf[start + 8]
        if ttl <= 1:
            return False
        buf[start + 8] = ttl - 1
        # RFC 1624: the word holding the TTL dropped by 0x0100, so the checksum
        # rises by 0x0100 with end-around carry (as Linux's ip_decrease_ttl).
        csum = ((buf[start + 10] << 8) | buf[start + 11]) + 0x0100
        csum = (csum & 0xFFFF) + (csum >> 16)
        buf[start + 10] = csum >> 8
        buf[start + 11] = csum & 0xFF
        return True
    hop_limit = buf[start + 7]
    if hop_limit <= 1:
        return False
    buf[start + 7] = hop_limit - 1
    return True


class UdpBackend(Backend):
    name: ClassVar[str] = "udp"
    overhead: ClassVar[int] = 28  # outer IPv4 20 + UDP 8
    transport: ClassVar[Literal["udp", "packet"]] = "udp"

    def __init__(self, *, port: int = UDP_PORT):
        self.port = port or UDP_PORT

    @property
    def headroom(self) -> int:
        return 0

    def encap(self, buf: bytearray, start: int, end: int, peer: Peer) -> int:
        if not decrement_ttl(buf, start):
            return -DropReason.TTL_EXCEEDED
        return start

    def decap(self, buf: bytearray, end: int) -> int:
        if end < 20:
            return -DropReason.TRUNCATED
        version = buf[0] >> 4
        if version != 4 and version != 6:
            return -DropReason.BAD_VERSION
        if version == 6 and end < 40:
            return -DropReason.TRUNCATED
        if not decrement_ttl(buf, 0):
            return -DropReason.TTL_EXCEEDED
        return 0

    def lease_data(self) -> tuple[str | None, dict[str, object] | None]:
        # flannel's udp backend sets neither BackendType nor BackendData.
        return None, None
