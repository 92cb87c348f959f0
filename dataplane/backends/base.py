"""The one shape every backend has, and the reasons a packet can be dropped.

A backend is pure: it writes its headers in front of a packet that already
sits in a buffer (encap) or finds the inner packet in a received datagram
(decap). Routing, MTU checks, ICMP errors and counters live in the forwarder;
sockets and devices live in dataplane/io.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import IntEnum
from typing import ClassVar, Literal

from dataplane.peers import Peer


class DropReason(IntEnum):
    """Why a packet went no further. Each has its own counter."""

    TRUNCATED = 1  # shorter than the headers it claims to carry
    BAD_VERSION = 2  # not IPv4 or IPv6
    NO_ROUTE = 3  # destination in no known peer subnet
    TTL_EXCEEDED = 4  # TTL / hop limit ran out (udp backend decrements, as flannel)
    TOO_BIG = 5  # larger than the path allows (ICMP frag-needed sent when DF)
    BAD_FLAGS = 6  # VXLAN flags other than the I bit, or reserved bits set
    WRONG_VNI = 7  # VXLAN network identifier is not ours
    UNKNOWN_MAC = 8  # inner Ethernet destination not ours / no FDB entry
    BAD_ETHERTYPE = 9  # inner frame is neither IPv4 nor IPv6
    UNKNOWN_SOURCE = 10  # outer source is not the public IP of a known peer
    SPOOFED = 11  # inner source is not in the sending peer's subnet
    NEIGH_UNRESOLVED = 12  # host-gw: gateway MAC not known yet (resolution requested)
    NOT_ONLINK = 13  # host-gw: the peer is not on a connected network
    SEND_FAILED = 14  # the kernel refused the send (ENOBUFS, EHOSTUNREACH, …)
    WRITE_FAILED = 15  # the device refused the write
    OVERSIZED = 16  # datagram larger than the receive buffer (truncated by the kernel)


DROP_REASON_NAMES: dict[int, str] = {r.value: r.name.lower() for r in DropReason}


class Backend(ABC):
    """One encapsulation. Subclasses are small; see vxlan.py, udp.py, hostgw.py."""

    name: ClassVar[str]
    #: Bytes added on the underlay per inner IP packet (vxlan 50, udp 28, host-gw 0).
    overhead: ClassVar[int]
    #: How the result leaves: a UDP datagram to peer.sockaddr, or an Ethernet frame
    #: on the underlay interface through an AF_PACKET socket.
    transport: ClassVar[Literal["udp", "packet"]]
    #: True when the device carries Ethernet frames (TAP) rather than IP packets (TUN).
    l2_device: bool = False

    @property
    @abstractmethod
    def headroom(self) -> int:
        """Bytes encap writes in front of a device packet."""

    @abstractmethod
    def encap(self, buf: bytearray, start: int, end: int, peer: Peer) -> int:
        """Write headers in front of buf[start:end]; return the new start or -DropReason."""

    def decap(self, buf: bytearray, end: int) -> int:
        """Find the device packet in a received datagram buf[0:end].

        Returns its start offset (it runs to `end`) or -DropReason.
        Backends without a receive path (host-gw) never get datagrams.
        """
        raise NotImplementedError(f"{self.name} has no receive path")

    def lease_data(self) -> tuple[str | None, dict[str, object] | None]:
        """BackendType and BackendData for this node's lease (flannel's JSON)."""
        return self.name, None
