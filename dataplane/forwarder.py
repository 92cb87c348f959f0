"""The sans-I/O engine: packets in, packets out, drops counted by reason.

The runner (dataplane/io/runner.py) reads a device packet into a preallocated
buffer, leaving `backend.headroom` bytes free in front of it, and calls
`from_device`; the verdict says what to do with it:

    SEND     send buf[out_start:out_end] to out_peer (a datagram to
             out_peer.sockaddr, or a frame on the underlay for host-gw)
    REPLY    write `reply` back into the device (an ICMP error for the sender)
    DROP     nothing; the reason was counted

A datagram from the network goes to `from_network`; DELIVER means write
buf[out_start:out_end] into the device. Nothing here allocates per packet on
the forwarding path; ICMP errors (rare, and rate-limited by the kernel's
sender) are built with the codecs.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from dataplane.backends.base import Backend, DropReason
from dataplane.packet.icmp import (
    Icmp6Type,
    IcmpType,
    IcmpUnreachCode,
    build_icmpv4_error,
    build_icmpv6_error,
    should_send_icmp_error,
)
from dataplane.peers import Peer
from dataplane.routes import RouteTable

_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_IP_DF = 0x4000


def _net_mask(subnet: IPv4Network) -> tuple[int, int]:
    return int(subnet.network_address), int(subnet.netmask)


class Verdict(IntEnum):
    DROP = 0
    SEND = 1
    REPLY = 2
    DELIVER = 3


class Counters:
    """Packet and byte counters; drops indexed by DropReason."""

    __slots__ = (
        "batch_packets",
        "batches",
        "drops",
        "icmp_sent",
        "rx_bytes",
        "rx_packets",
        "tx_bytes",
        "tx_packets",
        "warm_passes",
    )

    def __init__(self) -> None:
        self.tx_packets = 0  # device → network
        self.tx_bytes = 0
        self.rx_packets = 0  # network → device
        self.rx_bytes = 0
        self.icmp_sent = 0
        self.drops = [0] * (max(DropReason) + 1)
        # Reader wake-ups and the packets they took, [device, network]: their ratio
        # is the mean batch size (kept by the I/O runner, which owns batching).
        self.batches = [0, 0]
        self.batch_packets = [0, 0]
        self.warm_passes = 0  # --keep-warm passes over the packet path (runner.Engine)

    def drop_counts(self) -> dict[str, int]:
        return {r.name.lower(): self.drops[r] for r in DropReason if self.drops[r]}

    def as_dict(self) -> dict[str, object]:
        return {
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "icmp_sent": self.icmp_sent,
            "drops": self.drop_counts(),
            "batches": {
                "device": {"batches": self.batches[0], "packets": self.batch_packets[0]},
                "network": {"batches": self.batches[1], "packets": self.batch_packets[1]},
            },
            "warm_passes": self.warm_passes,
        }


class Forwarder:
    """Routes device packets to peers through a backend, and back."""

    def __init__(
        self,
        backend: Backend,
        *,
        underlay_mtu: int = 1500,
        local_ip: IPv4Address | None = None,
        local_ip6: IPv6Address | None = None,
        accept_any_source: bool = False,
    ) -> None:
        self.backend = backend
        self.l2 = backend.l2_device
        self.headroom = backend.headroom
        # Largest inner IP packet that fits the underlay once encapsulated.
        self.max_inner = underlay_mtu - backend.overhead
        self.local_ip = local_ip
        self.local_ip6 = local_ip6
        self.accept_any_source = accept_any_source
        self.routes: RouteTable[Peer] = RouteTable()
        self.fdb: dict[bytes, Peer] = {}  # VtepMAC → peer (TAP mode, as the kernel's FDB)
        # public IP → the (subnet int, mask int) pairs leased from there, for the
        # source check (more than one while a node moves to a new lease).
        self._sources: dict[str, tuple[tuple[int, int], ...]] = {}
        self.counters = Counters()
        # Outputs of the last call (read by the runner right after it).
        self.out_start = 0
        self.out_end = 0
        self.out_peer: Peer | None = None
        self.reply = b""
        self.drop_reason = 0  # why the last DROP (or ICMP REPLY) happened
        if self.l2:
            self.from_device = self._from_tap  # type: ignore[method-assign]

    # -- peers ---------------------------------------------------------------------

    def add_peer(self, peer: Peer) -> None:
        old = self.routes.remove(peer.subnet)
        if old is not None:
            self._forget(old)
        self.routes.insert(peer.subnet, peer)
        if peer.vtep_mac is not None:
            self.fdb[peer.vtep_mac] = peer
        if isinstance(peer.subnet, IPv4Network):
            key = str(peer.public_ip)
            self._sources[key] = (*self._sources.get(key, ()), _net_mask(peer.subnet))

    def remove_peer(self, subnet: IPv4Network | IPv6Network) -> Peer | None:
        peer = self.routes.remove(subnet)
        if peer is not None:
            self._forget(peer)
        return peer

    def _forget(self, peer: Peer) -> None:
        if peer.vtep_mac is not None and self.fdb.get(peer.vtep_mac) is peer:
            del self.fdb[peer.vtep_mac]
        key = str(peer.public_ip)
        if isinstance(peer.subnet, IPv4Network) and key in self._sources:
            rest = tuple(n for n in self._sources[key] if n != _net_mask(peer.subnet))
            if rest:
                self._sources[key] = rest
            else:
                del self._sources[key]

    def peers(self) -> list[Peer]:
        return [peer for _, peer in self.routes.items()]

    def _drop(self, reason: int) -> int:
        self.counters.drops[reason] += 1
        self.drop_reason = reason
        return Verdict.DROP

    # -- device → network ----------------------------------------------------------

    def from_device(self, buf: bytearray, start: int, end: int) -> int:
        """An IP packet read from the TUN device sits at buf[start:end]."""
        length = end - start
        if length < 20:
            return self._drop(DropReason.TRUNCATED)
        version = buf[start] >> 4
        if version == 4:
            peer = self.routes.lookup_v4(_U32.unpack_from(buf, start + 16)[0])
        elif version == 6 and length >= 40:
            peer = self.routes.lookup_v6(int.from_bytes(buf[start + 24 : start + 40], "big"))
        else:
            return self._drop(DropReason.BAD_VERSION if version != 6 else DropReason.TRUNCATED)
        if peer is None:
            self._drop(DropReason.NO_ROUTE)
            return self._icmp_no_route(buf, start, end, version)
        if length > self.max_inner:
            self._drop(DropReason.TOO_BIG)
            return self._icmp_too_big(buf, start, end, version)
        new_start = self.backend.encap(buf, start, end, peer)
        if new_start < 0:
            return self._drop(-new_start)
        self.out_start = new_start
        self.out_end = end
        self.out_peer = peer
        counters = self.counters
        counters.tx_packets += 1
        counters.tx_bytes += length
        return Verdict.SEND

    def _from_tap(self, buf: bytearray, start: int, end: int) -> int:
        """An Ethernet frame read from the TAP device sits at buf[start:end].

        The kernel has already routed it (route → permanent neighbour → the peer's
        VtepMAC, as on flannel.1); weft's part is the FDB: VtepMAC → public IP.
        """
        length = end - start
        if length < 14 + 20:
            return self._drop(DropReason.TRUNCATED)
        peer = self.fdb.get(bytes(buf[start : start + 6]))
        if peer is None:
            # Broadcast, multicast (IPv6 ND, …) or a MAC no lease announced.
            return self._drop(DropReason.UNKNOWN_MAC)
        if length - 14 > self.max_inner:
            self._drop(DropReason.TOO_BIG)
            version = buf[start + 14] >> 4
            if self._icmp_too_big(buf, start + 14, end, version) == Verdict.REPLY:
                # Frame it back to the sender as if from the peer's VTEP.
                self.reply = (
                    bytes(buf[start + 6 : start + 12])
                    + bytes(buf[start : start + 6])
                    + bytes(buf[start + 12 : start + 14])
                    + self.reply
                )
                return Verdict.REPLY
            return Verdict.DROP
        new_start = self.backend.encap(buf, start, end, peer)
        self.out_start = new_start
        self.out_end = end
        self.out_peer = peer
        counters = self.counters
        counters.tx_packets += 1
        counters.tx_bytes += length
        return Verdict.SEND

    def _icmp_no_route(self, buf: bytearray, start: int, end: int, version: int) -> int:
        # flannel's udp proxy answers "net unreachable" (TTL 8) from the TUN address.
        if version == 4 and self.local_ip is not None:
            packet = bytes(buf[start:end])
            if should_send_icmp_error(packet):
                self.reply = build_icmpv4_error(
                    IcmpType.DEST_UNREACH, IcmpUnreachCode.NET, packet, self.local_ip, ttl=8
                )
                self.counters.icmp_sent += 1
                return Verdict.REPLY
        elif version == 6 and self.local_ip6 is not None:
            self.reply = build_icmpv6_error(
                Icmp6Type.DEST_UNREACH, 0, bytes(buf[start:end]), self.local_ip6
            )
            self.counters.icmp_sent += 1
            return Verdict.REPLY
        return Verdict.DROP

    def _icmp_too_big(self, buf: bytearray, start: int, end: int, version: int) -> int:
        # Path MTU discovery across the overlay: tell the sender the inner MTU.
        if version == 4:
            if self.local_ip is None or not _U16.unpack_from(buf, start + 6)[0] & _IP_DF:
                return Verdict.DROP
            packet = bytes(buf[start:end])
            if not should_send_icmp_error(packet, allow_icmp_queries=True):
                return Verdict.DROP
            self.reply = build_icmpv4_error(
                IcmpType.DEST_UNREACH,
                IcmpUnreachCode.FRAG_NEEDED,
                packet,
                self.local_ip,
                rest=self.max_inner,
            )
        elif version == 6 and self.local_ip6 is not None:
            self.reply = build_icmpv6_error(
                Icmp6Type.PACKET_TOO_BIG,
                0,
                bytes(buf[start:end]),
                self.local_ip6,
                rest=self.max_inner,
            )
        else:
            return Verdict.DROP
        self.counters.icmp_sent += 1
        return Verdict.REPLY

    # -- network → device ----------------------------------------------------------

    def from_network(self, buf: bytearray, end: int, source_ip: str) -> int:
        """A datagram payload received from `source_ip` sits at buf[0:end]."""
        start = self.backend.decap(buf, end)
        if start < 0:
            return self._drop(-start)
        if not self.accept_any_source:
            # flannel and the kernel take whatever reaches the port; weft takes
            # only what a known peer sends from inside its own subnet.
            subnets = self._sources.get(source_ip)
            if subnets is None:
                return self._drop(DropReason.UNKNOWN_SOURCE)
            ip = start + 14 if self.l2 else start
            if end - ip < 20:
                return self._drop(DropReason.TRUNCATED)
            if buf[ip] >> 4 != 4:
                return self._drop(DropReason.SPOOFED)
            inner_src = _U32.unpack_from(buf, ip + 12)[0]
            for net, mask in subnets:
                if inner_src & mask == net:
                    break
            else:
                return self._drop(DropReason.SPOOFED)
        self.out_start = start
        self.out_end = end
        counters = self.counters
        counters.rx_packets += 1
        counters.rx_bytes += end - start
        return Verdict.DELIVER
