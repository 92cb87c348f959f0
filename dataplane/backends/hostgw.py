"""host-gw: the inner IP packet goes, unchanged, to the peer's public IP as gateway.

weft sends it as an Ethernet frame to the gateway's MAC on the underlay
interface (AF_PACKET); the peer's kernel routes it to its pod. There is no
decap: replies arrive as ordinary routed packets. Peers must share L2: a peer
whose public IP is on no connected network is refused (NOT_ONLINK) rather than
sent towards a default route, and a gateway whose MAC is not yet known is
dropped (NEIGH_UNRESOLVED) and put on `unresolved` for the I/O edge to resolve.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import ClassVar, Literal

from dataplane.backends.base import Backend, DropReason
from dataplane.peers import Peer

_ETH = struct.Struct("!6s6sH")


class HostGwBackend(Backend):
    name: ClassVar[str] = "host-gw"
    overhead: ClassVar[int] = 0
    transport: ClassVar[Literal["udp", "packet"]] = "packet"

    def __init__(self, underlay_mac: bytes, connected: Iterable[IPv4Interface | IPv4Network]):
        self.underlay_mac = bytes(underlay_mac)
        self.connected = [c.network if isinstance(c, IPv4Interface) else c for c in connected]
        #: gateway public IP → its MAC, filled by the edge from the neighbour table / ARP.
        self.neighbours: dict[IPv4Address, bytes] = {}
        #: gateways a packet waited for; the edge resolves them and calls learn().
        self.unresolved: set[IPv4Address] = set()

    @property
    def headroom(self) -> int:
        return 14

    def is_onlink(self, gateway: IPv4Address) -> bool:
        return any(gateway in net for net in self.connected)

    def learn(self, gateway: IPv4Address, mac: bytes) -> None:
        self.neighbours[gateway] = bytes(mac)
        self.unresolved.discard(gateway)

    def encap(self, buf: bytearray, start: int, end: int, peer: Peer) -> int:
        mac = self.neighbours.get(peer.public_ip)
        if mac is None:
            if not self.is_onlink(peer.public_ip):
                return -DropReason.NOT_ONLINK
            self.unresolved.add(peer.public_ip)
            return -DropReason.NEIGH_UNRESOLVED
        ethertype = 0x0800 if buf[start] >> 4 == 4 else 0x86DD
        start -= 14
        _ETH.pack_into(buf, start, mac, self.underlay_mac, ethertype)
        return start
