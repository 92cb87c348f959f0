"""Per-packet trace events, sampled and rate-limited, for `weft trace live`.

The engine asks `Tracer.active` once per batch; only when someone is
listening does it hand packets here. Each subscriber has its own filter,
sampling, rate limit and a bounded queue: a slow or vanished reader loses
events (counted in `lost`), it never stalls the dataplane.

An event carries the packet as it is on the wire: for encapsulated traffic
the whole outer frame (Ethernet / IPv4 / UDP / VXLAN or raw IP), rebuilt
around the bytes weft sent or received, so a pcap of it opens in Wireshark
and `-d udp.port==8472,vxlan` shows the inner packet.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

from dataplane.backends.base import DROP_REASON_NAMES
from dataplane.packet.checksum import checksum_update16
from dataplane.packet.ethernet import build_ethernet
from dataplane.packet.ipv4 import IPProto, build_ipv4
from dataplane.packet.udp import build_udp

if TYPE_CHECKING:
    from dataplane.io.sockets import SourcePorts

_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
_VERDICT_NAMES = {0: "drop", 1: "send", 2: "reply", 3: "deliver"}
_ZERO_MAC = bytes(6)


class FilterError(ValueError):
    pass


@dataclass(frozen=True)
class TraceFilter:
    """A tcpdump-like conjunction: `icmp and host 10.244.2.5 and tx`, `port 80`, `drop`."""

    terms: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> TraceFilter:
        words = [w for w in (text or "").replace("&&", " and ").split() if w != "and"]
        terms: list[tuple[str, str]] = []
        i = 0
        while i < len(words):
            w = words[i].lower()
            if w in ("icmp", "tcp", "udp", "icmpv6"):
                terms.append(("proto", w))
            elif w in ("tx", "rx", "drop", "send", "deliver", "reply"):
                terms.append(("dir" if w in ("tx", "rx") else "verdict", w))
            elif w in ("host", "src", "dst", "port", "peer"):
                if i + 1 >= len(words):
                    raise FilterError(f"filter: {w!r} needs a value")
                terms.append((w, words[i + 1]))
                i += 1
            else:
                raise FilterError(
                    f"filter: unknown term {w!r} (use icmp|tcp|udp, tx|rx, drop, "
                    "host IP, src IP, dst IP, port N, peer IP, joined by 'and')"
                )
            i += 1
        return cls(tuple(terms))

    def matches(self, ev: dict[str, Any]) -> bool:
        for key, value in self.terms:
            if key == "host":
                if value not in (ev.get("src"), ev.get("dst")):
                    return False
            elif key == "port":
                if value not in (str(ev.get("sport")), str(ev.get("dport"))):
                    return False
            elif str(ev.get(key)) != value:
                return False
        return True


@dataclass
class Subscription:
    filter: TraceFilter
    sample: int = 1  # keep one packet in `sample`
    max_rate: float = 1000.0  # events per second at most
    limit: int = 0  # stop after this many events (0: no limit)
    maxlen: int = 4096
    events: deque[dict[str, Any]] = field(default_factory=deque)
    lost: int = 0
    sent: int = 0
    seen: int = 0
    tokens: float = 0.0
    wakeup: Callable[[], None] | None = None

    @property
    def done(self) -> bool:
        return bool(self.limit) and self.sent >= self.limit

    def admit(self, event: dict[str, Any]) -> bool:
        """Queue `event` if the rate budget and the buffer allow; else count it lost."""
        if self.tokens < 1 or len(self.events) >= self.maxlen:
            self.lost += 1
            return False
        self.tokens -= 1
        self.events.append(event)
        self.sent += 1
        return True

    @classmethod
    def from_request(cls, request: dict[str, Any]) -> Subscription:
        """A `weft trace live` request (filter, sample, rate, count) as a subscription."""
        return cls(
            TraceFilter.parse(str(request.get("filter") or "")),
            sample=max(1, int(request.get("sample") or 1)),
            max_rate=float(request.get("rate") or 1000),
            limit=int(request.get("count") or 0),
        )


def packet_summary(packet: bytes | memoryview) -> dict[str, Any]:
    """Addresses, protocol and ports of an IP packet (best effort, never raises)."""
    out: dict[str, Any] = {}
    if len(packet) < 20:
        return out
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        proto = packet[9]
        out["src"] = str(IPv4Address(bytes(packet[12:16])))
        out["dst"] = str(IPv4Address(bytes(packet[16:20])))
        l4 = ihl
    elif version == 6 and len(packet) >= 40:
        from ipaddress import IPv6Address

        proto = packet[6]
        out["src"] = str(IPv6Address(bytes(packet[8:24])))
        out["dst"] = str(IPv6Address(bytes(packet[24:40])))
        l4 = 40
    else:
        return out
    out["proto"] = _PROTO_NAMES.get(proto, str(proto))
    if proto in (6, 17) and len(packet) >= l4 + 4:
        out["sport"], out["dport"] = struct.unpack_from("!HH", packet, l4)
    elif proto in (1, 58) and len(packet) >= l4 + 2:
        out["icmp_type"], out["icmp_code"] = packet[l4], packet[l4 + 1]
    return out


class Tracer:
    """Builds trace events for the engine's subscribers."""

    def __init__(
        self,
        backend: str,
        *,
        local_ip: IPv4Address,
        local_mac: bytes,
        port: int,
        l2_device: bool,
        clock: Callable[[], float],
    ) -> None:
        self.backend = backend
        self.local_ip = local_ip
        self.local_mac = local_mac
        self.port = port
        self.l2_device = l2_device
        self.clock = clock
        self.subscribers: list[Subscription] = []
        self._last_refill = clock()
        #: set with --queues above 1: every event says which queue's process saw it
        self.queue: int | None = None
        #: vxlan: the sockets a flow's datagrams leave from (its outer source port)
        self.source_ports: SourcePorts | None = None

    @property
    def active(self) -> bool:
        return bool(self.subscribers)

    def subscribe(self, sub: Subscription) -> Subscription:
        sub.tokens = min(sub.max_rate, 100.0)
        self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)

    def start_batch(self) -> None:
        """Refill each subscriber's rate budget (once per batch, not per packet)."""
        now = self.clock()
        elapsed = now - self._last_refill
        self._last_refill = now
        for sub in self.subscribers:
            sub.tokens = min(sub.max_rate, sub.tokens + elapsed * sub.max_rate)

    def take(self, sub: Subscription, events: list[dict[str, Any]]) -> None:
        """Events traced elsewhere (a queue worker) joining `sub`'s stream under its
        limits: count, buffer, and the rate — which each worker also applied on its
        own, so without this N queues could send N times `--rate`."""
        self.start_batch()  # refill the rate budgets by the clock
        for event in events:
            if sub.done:
                break
            sub.admit(event)
        if events and sub.wakeup is not None:
            sub.wakeup()

    # -- events ---------------------------------------------------------------------

    def _offer(self, make: Callable[[], dict[str, Any]]) -> None:
        event: dict[str, Any] | None = None
        for sub in self.subscribers:
            if sub.done:
                continue
            sub.seen += 1
            if sub.seen % sub.sample:
                continue
            if event is None:
                event = make()
            if not sub.filter.matches(event):
                continue
            if sub.admit(event) and sub.wakeup is not None:
                sub.wakeup()

    def from_device(self, buf: bytearray, start: int, end: int, verdict: int, fwd: Any) -> None:
        """A device packet and what the forwarder did with it (call right after it)."""
        out_start, out_end, peer = fwd.out_start, fwd.out_end, fwd.out_peer
        reason = fwd.drop_reason

        def make() -> dict[str, Any]:
            inner_off = start + 14 if self.l2_device else start
            ev = self._base("tx", verdict, reason)
            ev.update(packet_summary(memoryview(buf)[inner_off:end]))
            ev["len"] = end - inner_off
            if verdict == 1 and peer is not None:
                ev["peer"] = str(peer.public_ip)
                payload = bytes(buf[out_start:out_end])
                if fwd.backend.transport == "packet":
                    ev["frame"] = payload.hex()  # already an Ethernet frame (host-gw)
                else:
                    sport, ports = self.port, self.source_ports
                    if ports is not None:
                        sport = ports.ports[ports.index(buf, inner_off, end)]
                    ev["frame"] = self._outer(
                        self.local_ip, sport, peer.public_ip, peer.port, payload
                    ).hex()
            else:
                ev["frame"] = self._bare(bytes(buf[start:end])).hex()
            return ev

        self._offer(make)

    def from_network(
        self, buf: bytearray, end: int, source: tuple[str, int], verdict: int, fwd: Any
    ) -> None:
        reason = fwd.drop_reason
        out_start = fwd.out_start

        def make() -> dict[str, Any]:
            ev = self._base("rx", verdict, reason)
            ev["peer"] = source[0]
            ev["len"] = end  # the datagram; replaced by the inner length when delivered
            if verdict == 3:
                inner_off = out_start + 14 if self.l2_device else out_start
                ev.update(packet_summary(memoryview(buf)[inner_off:end]))
                ev["len"] = end - inner_off
            try:
                src = IPv4Address(source[0])
            except ValueError:
                src = IPv4Address(0)
            datagram = bytearray(buf[:end])
            if self.backend == "udp" and verdict == 3 and end >= 20 and datagram[0] >> 4 == 4:
                # The udp backend decremented the TTL in place; show it as received.
                old = datagram[8] << 8 | datagram[9]
                datagram[8] += 1
                csum = checksum_update16(datagram[10] << 8 | datagram[11], old, old + 0x100)
                datagram[10:12] = csum.to_bytes(2, "big")
            ev["frame"] = self._outer(
                src, source[1], self.local_ip, self.port, bytes(datagram)
            ).hex()
            return ev

        self._offer(make)

    def _base(self, direction: str, verdict: int, reason: int) -> dict[str, Any]:
        ev: dict[str, Any] = {
            "t": self.clock(),
            "dir": direction,
            "backend": self.backend,
            "verdict": _VERDICT_NAMES.get(verdict, str(verdict)),
        }
        if self.queue is not None:
            ev["queue"] = self.queue
        if verdict in (0, 2) and reason:
            ev["reason"] = DROP_REASON_NAMES.get(reason, str(reason))
        return ev

    def _outer(
        self, src: IPv4Address, sport: int, dst: IPv4Address, dport: int, payload: bytes
    ) -> bytes:
        """The underlay frame as the kernel put it on the wire (checksum left 0)."""
        udp = build_udp(sport, dport, payload)
        ip = build_ipv4(src, dst, IPProto.UDP, udp, ttl=64)
        return build_ethernet(_ZERO_MAC, self.local_mac, 0x0800, ip)

    def _bare(self, packet: bytes) -> bytes:
        """A device packet that was not sent: framed so the pcap stays Ethernet."""
        if self.l2_device:
            return packet
        ethertype = 0x86DD if packet and packet[0] >> 4 == 6 else 0x0800
        return build_ethernet(_ZERO_MAC, _ZERO_MAC, ethertype, packet)


def write_pcap_header(f: Any) -> None:
    """Classic pcap, microsecond timestamps, LINKTYPE_ETHERNET."""
    f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))


def write_pcap_record(f: Any, t: float, frame: bytes) -> None:
    sec = int(t)
    usec = int((t - sec) * 1_000_000)
    f.write(struct.pack("<IIII", sec, usec, len(frame), len(frame)))
    f.write(frame)
