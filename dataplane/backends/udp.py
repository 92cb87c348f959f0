"""flannel's original backend: the raw IP packet is the UDP payload (port 8285).

As flannel's C proxy does, the TTL is decremented on the way out and on the
way in (with an incremental checksum fix), and a packet whose TTL runs out
is dropped.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from dataplane.backends.base import Backend, DropReason
from dataplane.packet.ipv4 import ipv4_decrement_ttl
from dataplane.peers import Peer

UDP_PORT = 8285


def decrement_ttl(buf: bytearray, start: int) -> bool:
    """Decrement the IPv4 TTL / IPv6 hop limit at buf[start]; False when it runs out."""
    if buf[start] >> 4 == 4:
        return ipv4_decrement_ttl(buf, start) != 0  # RFC 1624 checksum patch included
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
